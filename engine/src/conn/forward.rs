//! A request for what only another node serves (a durable topic's log
//! lives on its owner) sent on to that node, its answer passed back: a
//! client may ask any node. The sent-on request is marked
//! (`http::FORWARDED_HEADER`) and never sent on again.

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// How long connecting to the other node, and each read of its answer,
/// may take: past it the client gets 503 `owner_unreachable` (retryable).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `head` and `body` on to `node` and returns its response, for a
/// client connection that stays open or not (`keep_alive`).
pub(super) async fn forward(node: &str, head: &RequestHead, body: &[u8], keep_alive: bool) -> Vec<u8> {
    match exchange(node, head, body, keep_alive).await {
        Ok(Ok(response)) => response,
        // An answer that cannot be passed on (over the size limit, not
        // HTTP as this node reads it): asking again gets the same.
        Ok(Err(e)) => {
            let why = format!("node {node} answered the request sent on to it with what cannot be passed on: {e}");
            http::json_error(502, "bad_gateway", &why, keep_alive)
        }
        Err(e) => {
            let why = format!("the request was sent on to node {node}, which did not answer it: {e}");
            http::json_error(503, "owner_unreachable", &why, keep_alive)
        }
    }
}

/// The owner's response for the client, or why it cannot be passed on;
/// an I/O error when the owner could not be asked or did not answer.
async fn exchange(
    node: &str,
    head: &RequestHead,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<Result<Vec<u8>, http::HttpError>> {
    let other = |e: glommio::GlommioError<()>| io::Error::other(e.to_string());
    let mut stream = TcpStream::connect_timeout(node, FORWARD_TIMEOUT).await.map_err(other)?;
    // Each read and each write waits at most this long.
    stream.set_read_timeout(Some(FORWARD_TIMEOUT)).map_err(other)?;
    stream.set_write_timeout(Some(FORWARD_TIMEOUT)).map_err(other)?;
    stream.write_all(&http::forwarded_request(head, node, body)).await?;
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match http::parse_response(&answer) {
            Ok(Some((status, content_type, body))) => {
                return Ok(Ok(http::response(status, &content_type, body, keep_alive)))
            }
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::other("closed before its whole answer"));
        }
        answer.extend_from_slice(&chunk[..n]);
    }
}
