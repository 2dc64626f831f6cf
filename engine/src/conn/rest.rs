//! The HTTP requests a connection may make before (or instead of) a
//! WebSocket: publishes, health, readiness, metrics and topic listings.

use super::*;

/// Answers a plain HTTP request.
pub(super) async fn respond(
    shard: &Rc<Shard>,
    head: &RequestHead,
    route: Route,
    body: Bytes,
    keep_alive: bool,
) -> Vec<u8> {
    match route {
        Route::Healthz => http::json(200, &StatusBody { status: "ok".into() }, keep_alive),
        Route::Readyz => {
            let (status, state) = readiness(shard);
            http::json(status, &StatusBody { status: state.into() }, keep_alive)
        }
        Route::Cluster => cluster(shard, &head.query, keep_alive),
        Route::Metrics | Route::Latency | Route::ListTopics | Route::TopicInfo(_) => {
            control(shard, route, &head.query, keep_alive).await
        }
        Route::LegacyPublish => legacy_publish(shard, &body, keep_alive).await,
        Route::TopicPublish(name) => {
            let topic = match TopicName::new(&name) {
                Ok(t) => t,
                Err(e) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
            };
            let textual = head.content_type.starts_with("text/") || head.content_type.starts_with("application/json");
            let kind =
                if textual && std::str::from_utf8(&body).is_ok() { PayloadKind::Text } else { PayloadKind::Binary };
            let options = match publish_options(&head.query) {
                Ok(options) => options,
                Err(why) => return http::json_error(400, "bad_request", &why, keep_alive),
            };
            match shard.publish(topic.clone(), kind, body, options).await {
                Ok(seq) => http::json(200, &PublishAnswer::accepted(topic.as_str(), seq), keep_alive),
                Err(e) => owner_error(e, keep_alive),
            }
        }
        Route::TopicDeclare(name) | Route::TopicDelete(name) | Route::TopicRead(name) => {
            let topic = match TopicName::new(&name) {
                Ok(t) => t,
                Err(e) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
            };
            // A durable log lives on its topic's owner node: declared,
            // deleted and read there, the request sent on if it came here
            // (once: a request sent on is refused where views differ).
            let owner = shard.broker.borrow().topology().and_then(|t| t.owner_of(&topic).map(str::to_string));
            if let Some(owner) = owner.filter(|o| o != shard.config.advertise()) {
                if !head.forwarded {
                    return crate::conn::forward::forward(&owner, head, &body, keep_alive).await;
                }
                let why = format!("topic {} is owned by node {owner}: its log is served there", topic.as_str());
                return http::json_error(421, "owned_elsewhere", &why, keep_alive);
            }
            crate::conn::durable_api::respond(shard, route_kind(&head.method), topic, &head.query, &body, keep_alive)
                .await
        }
        Route::SnapshotCreate | Route::SnapshotList | Route::SnapshotShow(_) | Route::SnapshotDelete(_) => {
            crate::conn::durable_api::snapshots(shard, route, keep_alive).await
        }
        Route::MethodNotAllowed => {
            http::json_error(405, "method_not_allowed", "method not allowed on this path", keep_alive)
        }
        _ => http::json_error(404, "not_found", "no such path", keep_alive),
    }
}

/// Readiness: 503 "not ready" while starting or draining, 503 "full" at the
/// connection limit (alive: FluxBalancer keeps its topics where they are;
/// a Kubernetes Service stops sending it new connections), else 200.
pub(super) fn readiness(shard: &Shard) -> (u16, &'static str) {
    if !shard.node.ready.load(Ordering::Relaxed) {
        (503, "not ready")
    } else if shard.node.connections.load(Ordering::Relaxed) >= shard.config.connections_max() {
        (503, "full")
    } else {
        (200, "ready")
    }
}

/// Serves one request on a connection admitted over the connection limit
/// (see `ADMIN_CONNECTIONS_RESERVED`): `/healthz`, `/readyz` and `/metrics`
/// are answered as usual, anything else with 503 `too_many_connections`;
/// then the connection closes.
pub async fn serve_admin_only(shard: Rc<Shard>, stream: TcpStream, admin: AdminConnection) {
    let io = Io(Rc::new(Socket(RefCell::new(stream))));
    let mut buf = BytesMut::new();
    let wait = shard.config.handshake_timeout();
    let read = async {
        // FluxBalancer's checks start with a PROXY header (the LOCAL command).
        if shard.config.proxy_protocol() && read_proxy_header(&shard, &io, &mut buf).await.is_err() {
            return Ok(None);
        }
        Ok(read_head(&shard, &io, &mut buf).await.ok().flatten())
    };
    let Ok(Some(head)) = glommio::timer::timeout(wait, read).await else { return };
    let response = match http::route(&head.method, &head.path) {
        route @ (Route::Healthz | Route::Readyz | Route::Metrics) => {
            respond(&shard, &head, route, Bytes::new(), false).await
        }
        _ => http::json_error(503, "too_many_connections", "connection limit reached", false),
    };
    let _ = io.write_all(&response).await;
    drop(admin);
}

/// `GET /v1/cluster[?topic=T]`: the node's view of its cluster, from its
/// configuration (no I/O).
fn cluster(shard: &Rc<Shard>, query: &str, keep_alive: bool) -> Vec<u8> {
    let config = &shard.config;
    // The set this shard acts on (from etcd, it changes).
    let topology = shard.broker.borrow().topology().cloned().unwrap_or_else(|| config.topology().clone());
    let topology = &topology;
    let asked = http::query_pairs(query).into_iter().find(|(k, _)| k == "topic").map(|(_, v)| v);
    let (topic, owner) = match asked.map(|t| TopicName::new(&t)) {
        None => (None, None),
        Some(Err(e)) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
        Some(Ok(t)) => {
            let owner = topology.owner_of(&t).map(str::to_string);
            (Some(t.as_str().to_string()), owner)
        }
    };
    let body = proto::admin::ClusterBody {
        membership: if config.etcd().is_some() {
            "etcd"
        } else if config.static_peers() {
            "static"
        } else {
            "single"
        }
        .into(),
        version: topology.version(),
        node: config.advertise().to_string(),
        members: topology.members().to_vec(),
        topic,
        owner,
        forwarding: config.static_peers() || config.etcd().is_some(),
    };
    http::json(200, &body, keep_alive)
}

/// Answers a control-plane request in the shard's low-share task queue.
pub(super) async fn control(shard: &Rc<Shard>, route: Route, query: &str, keep_alive: bool) -> Vec<u8> {
    let task_shard = shard.clone();
    let listing = TopicQuery::from_query(query);
    let work = async move {
        let shard = &task_shard;
        match route {
            Route::Metrics => {
                let text = metrics::render_prometheus(&shard.gather_stats(None).await);
                http::response(200, "text/plain; version=0.0.4", text.as_bytes(), keep_alive)
            }
            Route::Latency => http::json(200, &metrics::latency_report(&shard.gather_stats(None).await), keep_alive),
            Route::TopicInfo(name) => match TopicName::new(&name) {
                Err(e) => http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
                Ok(topic) => {
                    // The smallest name with the topic's name as prefix is
                    // the topic itself, when it exists.
                    let query = TopicQuery { prefix: topic.as_str().to_string(), after: None, limit: 1 };
                    match topic_list(shard, query).await.topics.pop() {
                        Some(info) if info.topic == topic.as_str() => http::json(200, &info, keep_alive),
                        _ => http::json_error(404, "unknown_topic", "no such topic on this node", keep_alive),
                    }
                }
            },
            _ => match listing {
                Err(why) => http::json_error(400, "bad_request", &why.to_string(), keep_alive),
                Ok(query) => http::json(200, &topic_list(shard, query).await, keep_alive),
            },
        }
    };
    match glommio::spawn_local_into(work, shard.control_queue) {
        Ok(task) => task.await,
        Err(e) => http::json_error(500, "internal", &format!("cannot schedule: {e}"), false),
    }
}

/// Which durable operation a method on `/v1/topics/{topic}[/messages]` is.
fn route_kind(method: &str) -> crate::conn::durable_api::Op {
    match method {
        "PUT" => crate::conn::durable_api::Op::Declare,
        "DELETE" => crate::conn::durable_api::Op::Delete,
        _ => crate::conn::durable_api::Op::Read,
    }
}

/// A topic publish's `?ack=none|local&key=K`.
fn publish_options(query: &str) -> Result<PublishOptions, String> {
    let mut options = PublishOptions::default();
    for (name, value) in http::query_pairs(query) {
        match name.as_str() {
            "ack" => options.ack = Some(proto::durable::AckLevel::parse(&value).map_err(|e| e.to_string())?),
            "key" if value.len() > proto::limits::KEY_BYTES_MAX => {
                return Err(format!("key is longer than {} bytes", proto::limits::KEY_BYTES_MAX))
            }
            "key" => options.key = Some(Bytes::from(value.into_bytes())),
            _ => return Err(format!("unknown parameter {name:?} (ack, key)")),
        }
    }
    Ok(options)
}

pub(super) fn owner_error(e: OwnerError, keep_alive: bool) -> Vec<u8> {
    http::json_error(e.http_status(), e.code(), &e.to_string(), keep_alive)
}

/// The original RayFlux publish body.
#[derive(Deserialize)]
pub(super) struct LegacyPublish {
    topic: String,
    message: String,
}

pub(super) async fn legacy_publish(shard: &Rc<Shard>, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let request: LegacyPublish = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return http::json_error(
                400,
                "bad_request",
                &format!("expected {{\"topic\", \"message\"}}: {e}"),
                keep_alive,
            )
        }
    };
    let topic = match TopicName::new(&request.topic) {
        Ok(t) => t,
        Err(e) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
    };
    if request.message.len() > shard.config.message_bytes_max() {
        return http::json_error(413, "payload_too_large", "message is over the size limit", keep_alive);
    }
    match shard.publish(topic.clone(), PayloadKind::Text, Bytes::from(request.message), PublishOptions::default()).await
    {
        Ok(seq) => http::json(200, &PublishAnswer::accepted(topic.as_str(), seq), keep_alive),
        Err(e) => owner_error(e, keep_alive),
    }
}

/// One page of the merged view of topics across shards: the owner's
/// figures plus the subscriber count from every shard, and the cursor of
/// the next page (the last name of this one) when there is more.
pub(super) async fn topic_list(shard: &Rc<Shard>, query: TopicQuery) -> TopicPage {
    let limit = query.limit;
    // One more than the page from each shard tells whether there is more.
    let stats = shard.gather_stats(Some(TopicQuery { limit: limit + 1, ..query })).await;
    let mut subscribers: HashMap<&str, u64> = HashMap::new();
    for s in &stats {
        for (name, n) in &s.local_subscribers {
            *subscribers.entry(name.as_str()).or_default() += n;
        }
    }
    let mut topics: Vec<TopicInfo> = stats
        .iter()
        .flat_map(|s| s.owned_topics.iter())
        .map(|t| TopicInfo {
            topic: t.name.as_str().to_string(),
            last_seq: t.last_seq,
            first_seq: t.first_seq,
            retained_messages: t.retained_messages as u64,
            retained_bytes: t.retained_bytes as u64,
            subscribers: subscribers.get(t.name.as_str()).copied().unwrap_or(0),
            publish_rate_per_sec: t.publish_rate_per_sec,
            owner_shard: t.name.owner_shard(shard.shards),
            epoch: t.epoch.to_string(),
            durable: t.durable.map(|d| DurableInfo {
                ack: d.spec.ack.as_str().to_string(),
                retention: d.spec.retention,
                log_first_seq: d.log_first_seq,
                local_first_seq: d.local_first_seq,
                archived_bytes: d.archived_bytes,
                archived_segments: d.archived_segments as u64,
                log_messages: d.log_messages,
                log_bytes: d.log_bytes,
                segments: d.segments as u64,
                keys: d.keys as u64,
                unwritten: d.unwritten as u64,
                failed: d.failed,
            }),
        })
        .collect();
    topics.sort_by(|a, b| a.topic.cmp(&b.topic));
    let more = topics.len() > limit;
    topics.truncate(limit);
    let next = if more { topics.last().map(|t| t.topic.clone()) } else { None };
    TopicPage { topics, next }
}
