//! Health checks (sans-IO part): the request a check sends and how the
//! answer is judged. A node passes when it accepts a TCP connection and
//! answers `GET /readyz` with status 200 within the check timeout; FluxNode
//! answers 503 while starting or draining.

/// The check request. `Connection: close` so the node closes after
/// answering.
pub const REQUEST: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: fluxbalancer\r\nConnection: close\r\n\r\n";

/// The verdict on the bytes received so far: `Some(true)` on a 200 status
/// line, `Some(false)` on any other complete status line or garbage, `None`
/// while the status line is incomplete.
pub fn judge(received: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(received) {
        Ok(_) if response.code.is_some() => Some(response.code == Some(200)),
        Ok(_) => None,
        Err(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), Some(true));
        assert_eq!(judge(b"HTTP/1.1 200 OK\r\n"), Some(true), "the status line is enough");
        assert_eq!(judge(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(false));
        assert_eq!(judge(b"HTTP/1.1 20"), None);
        assert_eq!(judge(b""), None);
        assert_eq!(judge(b"SSH-2.0-OpenSSH\r\n"), Some(false));
    }
}
