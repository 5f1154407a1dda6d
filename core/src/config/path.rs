//! The field an error is about, from where in the document the parser stopped.
//!
//! serde_json reports the line and column of an error; the operator needs the field
//! (`clients[3].key_sha256`). Rather than tracking the path while deserialising (a wrapper
//! around every value, a third of the module's code), the document is scanned again up to the
//! error's position, only when there is an error.

/// The byte offset just after the character serde_json reports at `line` and `column` (both
/// 1-based; column 0 is the start of the line).
pub(super) fn offset_of(json: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match json
            .get(start..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            Some(nl) => start += nl + 1,
            None => return json.len(),
        }
    }
    start.saturating_add(column).min(json.len())
}

enum Frame {
    /// An object; the member whose key was read last, until its value ends with `,`.
    Object(Option<String>),
    /// An array; the index of its current element, when one has started.
    Array(Option<usize>),
}

/// The path of the value being read when the parser had consumed `json[..offset]`: members
/// by name (`limiter.on_error`), elements by index (`clients[3]`), an object whose closing
/// brace was read by its own path (a missing field), the document itself as `""`.
pub(super) fn path_at(json: &[u8], offset: usize) -> String {
    let text = json.get(..offset).unwrap_or(json);
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        match b {
            b'{' => {
                start_value(&mut stack);
                stack.push(Frame::Object(None));
            }
            b'[' => {
                start_value(&mut stack);
                stack.push(Frame::Array(None));
            }
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object(key)) => *key = None,
                Some(Frame::Array(Some(n))) => *n += 1,
                _ => {}
            },
            b'"' => {
                let start = i;
                while let Some(&c) = text.get(i) {
                    i += 1;
                    match c {
                        b'\\' => i += 1,
                        b'"' => break,
                        _ => {}
                    }
                }
                let end = i.saturating_sub(1).max(start);
                match stack.last_mut() {
                    Some(Frame::Object(key @ None)) => {
                        *key = Some(key_text(text, start, end));
                    }
                    _ => start_value(&mut stack),
                }
            }
            b if b.is_ascii_whitespace() || b == b':' => {}
            _ => start_value(&mut stack),
        }
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object(Some(key)) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Array(Some(n)) => {
                path.push('[');
                path.push_str(&n.to_string());
                path.push(']');
            }
            Frame::Object(None) | Frame::Array(None) => {}
        }
    }
    path
}

/// The key between the quotes at `start..end`, its escapes decoded (`"n\u0061me"` is the
/// key `name`, as serde_json reads it); raw text if it does not decode.
fn key_text(text: &[u8], start: usize, end: usize) -> String {
    let raw = text.get(start..end).unwrap_or_default();
    if raw.contains(&b'\\') {
        if let Some(quoted) = text.get(start.saturating_sub(1)..end.saturating_add(1)) {
            if let Ok(key) = serde_json::from_slice::<String>(quoted) {
                return key;
            }
        }
    }
    String::from_utf8_lossy(raw).into_owned()
}

/// A value starts: in an array, it is the current element.
fn start_value(stack: &mut [Frame]) {
    if let Some(Frame::Array(n @ None)) = stack.last_mut() {
        *n = Some(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(json: &str, marker: &str) -> String {
        let offset = json.find(marker).unwrap() + marker.len();
        path_at(json.as_bytes(), offset)
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let doc = r#"{"clh\u0065nts": [{"n\"ame": 1}]}"#;
        assert_eq!(at(doc, "1"), r#"clhents[0].n"ame"#);
    }

    #[test]
    fn paths_of_members_and_elements() {
        let doc = r#"{"clients": [{"name": "a"}, {"name": "b", "rpm": 5}], "limiter": {"on_error": "x"}}"#;
        assert_eq!(at(doc, r#""rpm""#), "clients[1].rpm");
        assert_eq!(at(doc, r#""rpm": 5"#), "clients[1].rpm");
        assert_eq!(at(doc, r#""rpm": 5}"#), "clients[1]");
        assert_eq!(at(doc, r#""b""#), "clients[1].name");
        assert_eq!(at(doc, r#""x""#), "limiter.on_error");
        assert_eq!(at(doc, r#""x"}}"#), "");
        assert_eq!(at(r#"{"a": [[1, 2], [3, "x"]]}"#, "\"x\""), "a[1][1]");
        assert_eq!(at(r#"{"a\"b": 1}"#, "1"), "a\"b");
    }

    #[test]
    fn offsets_from_lines_and_columns() {
        let doc = b"{\n  \"a\": 1,\n  \"b\": x\n}";
        assert_eq!(offset_of(doc, 1, 1), 1);
        assert_eq!(offset_of(doc, 3, 8), 20);
        assert_eq!(doc.get(19), Some(&b'x'));
        assert_eq!(offset_of(doc, 9, 9), doc.len());
    }
}
