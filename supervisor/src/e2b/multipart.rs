//! The little of `multipart/form-data` (RFC 7578) E2B's file uploads use: each part's name, file name and bytes.
//! Pure and bounded (the body is already read within the upload limit); fuzzed.

/// One part of a form.
#[derive(Debug, PartialEq, Eq)]
pub struct Part<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub data: &'a [u8],
}

/// The boundary a `Content-Type: multipart/form-data; boundary=…` names.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let v = v.trim().trim_matches('"');
        (k.trim().eq_ignore_ascii_case("boundary") && !v.is_empty() && v.len() <= 200).then(|| v.to_string())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A `Content-Disposition` parameter (`name`, `filename`), quoted or not.
fn param(disposition: &str, key: &str) -> Option<String> {
    disposition.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        k.trim().eq_ignore_ascii_case(key).then(|| v.replace("\\\"", "\""))
    })
}

/// The parts of `body`, or what is wrong with it.
pub fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, String> {
    let delim = format!("--{boundary}");
    let start = find(body, delim.as_bytes()).ok_or("no boundary in the body")?;
    let mut rest = &body[start + delim.len()..];
    let sep = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    loop {
        if rest.starts_with(b"--") {
            return Ok(parts); // the closing delimiter
        }
        rest = rest.strip_prefix(b"\r\n").ok_or("a boundary not followed by CRLF")?;
        let head_end = find(rest, b"\r\n\r\n").ok_or("a part without the end of its headers")?;
        let head = std::str::from_utf8(&rest[..head_end]).map_err(|_| "part headers are not UTF-8")?;
        let disposition = head
            .split("\r\n")
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition")))
            .map(|(_, v)| v.trim().to_string())
            .ok_or("a part without Content-Disposition")?;
        let name = param(&disposition, "name").ok_or("a part without a name")?;
        let filename = param(&disposition, "filename");
        let data_start = head_end + 4;
        let end = find(&rest[data_start..], sep.as_bytes()).ok_or("a part that never ends")?;
        parts.push(Part { name, filename, data: &rest[data_start..data_start + end] });
        if parts.len() > 1000 {
            return Err("more than 1000 parts".into());
        }
        rest = &rest[data_start + end + sep.len()..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_bad_ones_are_refused() {
        let ct = "multipart/form-data; boundary=\"xyz\"";
        let b = boundary(ct).unwrap();
        let body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/home/user/a.txt\"\r\n\
Content-Type: application/octet-stream\r\n\r\nhello\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; \
filename=\"b\"\r\n\r\n\r\n--xyz--\r\n";
        let parts = parse(body, &b).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].filename.as_deref(), parts[0].data),
            ("file", Some("/home/user/a.txt"), &b"hello"[..])
        );
        assert_eq!(parts[1].data, b"");
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data; boundary=abc").as_deref(), Some("abc"));
        for bad in
            [&b"nothing"[..], b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xyz--", b"--xyz\r\nX: y\r\n\r\nx"]
        {
            assert!(parse(bad, "xyz").is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // Every prefix of a good body is refused or parsed without panicking.
        for n in 0..body.len() {
            let _ = parse(&body[..n], "xyz");
        }
    }
}
