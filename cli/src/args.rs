//! A small command-line parser: `--flag`, `--option VALUE`, `--option=VALUE`, `--` and
//! positionals, checked against what each command declares. Enough for a handful of commands,
//! and its messages name the command the user typed.

use std::collections::BTreeMap;

/// One option a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// Long name without the dashes, e.g. `rpm` for `--rpm`.
    pub name: &'static str,
    /// Placeholder of its value (`N`, `NAME`), or `None` for a flag.
    pub value: Option<&'static str>,
}

/// An option that takes a value.
pub const fn value(name: &'static str, placeholder: &'static str) -> Opt {
    Opt {
        name,
        value: Some(placeholder),
    }
}

/// An option without a value.
pub const fn flag(name: &'static str) -> Opt {
    Opt { name, value: None }
}

/// What was given on the command line, after checking it against the declared options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Arguments that are not options, in order.
    pub positionals: Vec<String>,
    values: BTreeMap<&'static str, String>,
    flags: Vec<&'static str>,
    /// `-h` or `--help` was given.
    pub help: bool,
}

impl Parsed {
    /// The value of `--name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// True when the flag `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }
}

/// Parses `args` (the words after the command's own name) against `opts`.
pub fn parse(args: &[String], opts: &[Opt]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            parsed.positionals.extend(it.by_ref().cloned());
            break;
        }
        if arg == "-h" || arg == "--help" {
            parsed.help = true;
            continue;
        }
        let Some(long) = arg.strip_prefix("--") else {
            // A lone `-` is a positional (standard input), `-x` is not an option we have.
            if arg.len() > 1 && arg.starts_with('-') {
                return Err(format!("unknown option {arg:?}"));
            }
            parsed.positionals.push(arg.clone());
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        let Some(opt) = opts.iter().find(|o| o.name == name) else {
            return Err(format!("unknown option \"--{name}\""));
        };
        if parsed.flag(opt.name) || parsed.values.contains_key(opt.name) {
            return Err(format!("--{name} is given more than once"));
        }
        match (opt.value, inline) {
            (None, None) => parsed.flags.push(opt.name),
            (None, Some(_)) => return Err(format!("--{name} takes no value")),
            (Some(_), Some(v)) => {
                parsed.values.insert(opt.name, v);
            }
            (Some(placeholder), None) => match it.next() {
                Some(v) if !v.starts_with("--") => {
                    parsed.values.insert(opt.name, v.clone());
                }
                _ => return Err(format!("--{name} needs a value: --{name} {placeholder}")),
            },
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: &[Opt] = &[value("name", "NAME"), value("rpm", "N"), flag("json")];

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_flags_and_positionals() {
        let p = parse(&words("--name a --rpm=5 --json file -"), OPTS).unwrap();
        assert_eq!(p.value("name"), Some("a"));
        assert_eq!(p.value("rpm"), Some("5"));
        assert!(p.flag("json"));
        assert!(!p.help);
        assert_eq!(p.positionals, ["file", "-"]);
        let p = parse(&words("-- --name"), OPTS).unwrap();
        assert_eq!(p.positionals, ["--name"]);
        assert!(parse(&words("-h"), OPTS).unwrap().help);
    }

    #[test]
    fn mistakes_are_explained() {
        let e = |s: &str| parse(&words(s), OPTS).unwrap_err();
        assert_eq!(e("--nme a"), "unknown option \"--nme\"");
        assert_eq!(e("-x"), "unknown option \"-x\"");
        assert_eq!(e("--name"), "--name needs a value: --name NAME");
        assert_eq!(e("--name --json"), "--name needs a value: --name NAME");
        assert_eq!(e("--json=1"), "--json takes no value");
        assert_eq!(e("--json --json"), "--json is given more than once");
        assert_eq!(e("--rpm 1 --rpm 2"), "--rpm is given more than once");
    }
}
