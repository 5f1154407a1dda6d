//! Model-name patterns of routing rules and allow-lists: `routing::Pattern`.
//!
//! Input: `<pattern>\n<model name>`, both UTF-8 and at most `MAX_MODEL_LEN` bytes (as config
//! validation and `body::parse` guarantee).
//!
//! Invariant: `Pattern::matches` agrees with a reference matcher written from the documented
//! meaning (exact name without wildcards; with them, `*` matches any run of characters and `?`
//! exactly one character), a dynamic-programming table over characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_core::body::MAX_MODEL_LEN;
use tollgate_core::routing::Pattern;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
    if pattern.len() > MAX_MODEL_LEN || name.len() > MAX_MODEL_LEN {
        return;
    }
    let p = Pattern::new(pattern);
    assert_eq!(p.as_str(), pattern);
    assert_eq!(p.is_glob(), pattern.contains(['*', '?']));
    let want = if p.is_glob() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        reference(&chars(pattern), &chars(name))
    } else {
        pattern == name
    };
    assert_eq!(p.matches(name), want, "{pattern:?} vs {name:?}");
});

/// `m[i][j]`: the first `i` pattern characters match the first `j` name characters.
fn reference(p: &[char], n: &[char]) -> bool {
    let mut m = vec![vec![false; n.len() + 1]; p.len() + 1];
    m[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=n.len() {
            m[i][j] = match p[i - 1] {
                '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                '?' => j > 0 && m[i - 1][j - 1],
                c => j > 0 && m[i - 1][j - 1] && n[j - 1] == c,
            };
        }
    }
    m[p.len()][n.len()]
}
