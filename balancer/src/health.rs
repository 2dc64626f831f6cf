//! Health checks (sans-IO part): the request a check sends and how the
//! answer is judged. A node passes when it accepts a TCP connection and
//! answers `GET /readyz` with status 200 within the check timeout; FluxNode
//! answers 503 while starting or draining. A node at its connection limit
//! answers 503 with the body `{"status":"full"}`: it is alive and keeps its
//! topics (moving them would strand the subscribers still connected to it,
//! who would never see what is published elsewhere), so it passes too; new
//! connections to it are refused by the node itself with a 503 the client
//! can retry.

/// The check request. `Connection: close` so the node closes after
/// answering.
pub const REQUEST: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: fluxbalancer\r\nConnection: close\r\n\r\n";

/// The verdict on the bytes received so far: `Some(true)` on a 200 status
/// line or a complete "full" answer, `Some(false)` on any other complete
/// answer or garbage, `None` while the answer is incomplete.
pub fn judge(received: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(received) {
        _ if response.code == Some(200) => return Some(true),
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(false),
    };
    if response.code != Some(503) {
        return Some(false);
    }
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let body = &received[head_len..];
    if body.len() < length {
        return None;
    }
    Some(is_full(&body[..length]))
}

/// Whether a readiness answer's body says the node is at its connection
/// limit.
fn is_full(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Readiness<'a> {
        status: &'a str,
    }
    serde_json::from_slice::<Readiness>(body).is_ok_and(|r| r.status == "full")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Some(true));
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\n"), Some(true), "the status line is enough");
        assert_eq!(judge(b"HTTP/1.1 503 Service Unavailable\r\n"), None, "the body may say full");
        let not_ready = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 22\r\n\r\n{\"status\":\"not ready\"}";
        assert_eq!(judge(not_ready), Some(false));
        let full = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 17\r\n\r\n{\"status\":\"full\"}";
        assert_eq!(judge(full), Some(true), "a full node is alive and keeps its topics");
        assert_eq!(judge(&full[..full.len() - 1]), None);
        assert_eq!(judge(b"HTTP/1.1 500 Internal\r\n\r\n"), Some(false));
        assert_eq!(judge(b"HTTP/1.1 20"), None);
        assert_eq!(judge(b""), None);
        assert_eq!(judge(b"SSH-2.0-OpenSSH\r\n"), Some(false));
    }
}
