//! Prices per model (`currency`, `prices`), and the clients' budgets (`budgets`,
//! `budget_utc_offset_minutes`).

use serde::Deserialize;

use super::ConfigError;
use crate::spend::{parse_micros, Budget, Measure, Period, Price, Prices};

/// Highest accepted price per million tokens, in currency units (a typo guard).
pub const MAX_PRICE_PER_MILLION: u64 = 1_000_000;

/// Highest accepted money budget, in currency units.
pub const MAX_MONEY_BUDGET: u64 = 1_000_000_000;

/// Highest accepted request or token budget.
pub const MAX_COUNT_BUDGET: u64 = 1_000_000_000_000_000;

/// The largest UTC offset, in minutes, either way (UTC-12:00 to UTC+14:00).
pub const MAX_UTC_OFFSET_MINUTES: i32 = 14 * 60;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub(super) model: String,
    pub(super) input_per_million_tokens: f64,
    #[serde(default)]
    pub(super) cached_input_per_million_tokens: Option<f64>,
    #[serde(default)]
    pub(super) cache_write_input_per_million_tokens: Option<f64>,
    pub(super) output_per_million_tokens: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub(super) window: String,
    #[serde(default)]
    pub(super) requests: Option<u64>,
    #[serde(default)]
    pub(super) tokens: Option<u64>,
    #[serde(default)]
    pub(super) money: Option<f64>,
}

/// `currency` and `prices`.
pub(super) fn compile_prices(
    currency: Option<String>,
    raw: Option<Vec<RawPrice>>,
) -> Result<Prices, ConfigError> {
    let currency = currency.unwrap_or_else(|| "USD".to_string());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ConfigError::new(
            "currency",
            format!("expected an ISO 4217 code such as \"USD\" or \"EUR\", got {currency:?}"),
        ));
    }
    let mut models: Vec<Price> = Vec::new();
    for (i, p) in raw.unwrap_or_default().into_iter().enumerate() {
        let at = |f: &str| format!("prices[{i}].{f}");
        if p.model.is_empty() || p.model.contains('*') {
            return Err(ConfigError::new(
                at("model"),
                "the exact model name the provider bills (after upstream_model), no globs",
            ));
        }
        if let Some(j) = models.iter().position(|o| o.model == p.model) {
            return Err(ConfigError::new(
                at("model"),
                format!("duplicate price for {:?} (also prices[{j}])", p.model),
            ));
        }
        let amount = |f: &str, v: f64| {
            parse_micros(v, MAX_PRICE_PER_MILLION).map_err(|m| ConfigError::new(at(f), m))
        };
        let input = amount("input_per_million_tokens", p.input_per_million_tokens)?;
        let cached_input = match p.cached_input_per_million_tokens {
            Some(v) => amount("cached_input_per_million_tokens", v)?,
            None => input,
        };
        let cache_write_input = match p.cache_write_input_per_million_tokens {
            Some(v) => amount("cache_write_input_per_million_tokens", v)?,
            None => input,
        };
        let output = amount("output_per_million_tokens", p.output_per_million_tokens)?;
        models.push(Price {
            model: p.model,
            input,
            cached_input,
            cache_write_input,
            output,
        });
    }
    Ok(Prices { currency, models })
}

/// `budget_utc_offset_minutes`.
pub(super) fn check_offset(v: Option<i32>) -> Result<i32, ConfigError> {
    let v = v.unwrap_or(0);
    if !(-12 * 60..=MAX_UTC_OFFSET_MINUTES).contains(&v) {
        return Err(ConfigError::new(
            "budget_utc_offset_minutes",
            format!("must be between -720 (UTC-12:00) and 840 (UTC+14:00), got {v}"),
        ));
    }
    Ok(v)
}

/// A client's `budgets` (errors name `<at>[j].<field>`): at most one per window, each with at
/// least one limit.
pub(super) fn compile_budgets(at: &str, raw: Vec<RawBudget>) -> Result<Vec<Budget>, ConfigError> {
    let mut out: Vec<Budget> = Vec::with_capacity(raw.len());
    for (j, b) in raw.into_iter().enumerate() {
        let field = |f: &str| format!("{at}[{j}].{f}");
        let Some(period) = Period::from_name(&b.window) else {
            return Err(ConfigError::new(
                field("window"),
                format!(
                    "expected one of minute, hour, day, week, month; got {:?}",
                    b.window
                ),
            ));
        };
        if out.iter().any(|o| o.period == period) {
            return Err(ConfigError::new(
                field("window"),
                format!("a second budget per {}: put its limits in one", b.window),
            ));
        }
        let count = |f: &str, v: Option<u64>| match v {
            Some(n) if n == 0 || n > MAX_COUNT_BUDGET => Err(ConfigError::new(
                field(f),
                format!("must be between 1 and {MAX_COUNT_BUDGET}, got {n}"),
            )),
            other => Ok(other),
        };
        let requests = count("requests", b.requests)?;
        let tokens = count("tokens", b.tokens)?;
        let money = match b.money {
            None => None,
            Some(v) => match parse_micros(v, MAX_MONEY_BUDGET) {
                Ok(0) => {
                    return Err(ConfigError::new(field("money"), "must be more than 0"));
                }
                Ok(m) => Some(m),
                Err(m) => return Err(ConfigError::new(field("money"), m)),
            },
        };
        if requests.is_none() && tokens.is_none() && money.is_none() {
            return Err(ConfigError::new(
                format!("{at}[{j}]"),
                "set at least one of requests, tokens, money",
            ));
        }
        let mut limits = [None; 3];
        for (m, v) in [
            (Measure::Requests, requests),
            (Measure::Tokens, tokens),
            (Measure::Money, money),
        ] {
            if let Some(slot) = limits.get_mut(m.index()) {
                *slot = v;
            }
        }
        out.push(Budget { period, limits });
    }
    out.sort_by_key(|b| b.period);
    Ok(out)
}
