//! Every limit of FluxNode, named, with the reason for its value.
//!
//! Defaults here are what `Config` starts from; the operator may change most
//! of them (see `config.rs`), within the hard ceilings below. Relations
//! between limits are checked at compile time for the defaults and at start
//! time for a configuration.

/// Largest WebSocket message (after reassembly of fragments) or HTTP publish
/// body, in bytes. 1 MiB matches NATS's default `max_payload`; larger
/// payloads belong in object storage with a pointer in the message.
pub const MESSAGE_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Hard ceiling for `message_bytes_max`: a frame is held whole in memory.
pub const MESSAGE_BYTES_MAX_CEILING: usize = 16 << 20;

/// Largest HTTP request head (request line plus headers). 16 KiB is what
/// nginx and Go's net/http accept by default for ordinary clients.
pub const HTTP_HEAD_BYTES_MAX: usize = 16 << 10;
/// Most headers parsed in one request; httparse needs a fixed array.
pub const HTTP_HEADERS_MAX: usize = 64;
/// Slack over `message_bytes_max` for a JSON publish body: the envelope
/// `{"topic": "...", "message": "..."}` and JSON escapes of the message.
pub const HTTP_BODY_SLACK_BYTES: usize = 64 << 10;

/// Longest topic name, in bytes. Names are keys, not paths; 255 fits the
/// native binary envelope's one-byte length.
pub const TOPIC_NAME_BYTES_MAX: usize = 255;
/// Longest message key (routing key / aggregate id), bytes: an identifier,
/// kept in every record and in the key index.
pub const KEY_BYTES_MAX: usize = 1024;

/// Default cap on bytes queued for one connection and not yet written.
/// 4 MiB holds a full default history replay (see the assert below) plus
/// a burst; a subscriber that falls further behind is a slow consumer.
pub const SEND_QUEUE_BYTES_MAX_DEFAULT: usize = 4 << 20;

/// Send queue of a node link's owner side: everything one node follows of
/// this one's topics shares it, so it is larger than a client's. Past it
/// the link is closed (the slow-consumer `disconnect` policy) and the
/// follower reconnects and resumes from the owner's history.
pub const LINK_SEND_QUEUE_BYTES_MAX: usize = 32 << 20;

/// Bytes a node may queue on one shard's link to another node before it
/// gives the link up (its forwarded publishes fail with
/// `owner_unreachable`, its follows resume on a new link): a dead or stuck
/// peer holds at most this much of a shard's memory.
pub const LINK_QUEUE_BYTES_MAX: usize = 32 << 20;
/// Replies and notices may exceed the send-queue cap by this much before the
/// connection is closed: they are never dropped, so they need a bound too.
pub const CONTROL_SLACK_BYTES: usize = 64 << 10;
/// Largest `dropped` notice (native protocol): the JSON envelope, a topic
/// name of `TOPIC_NAME_BYTES_MAX` bytes (JSON-escaped, up to 6 bytes each
/// in theory; names are printable in practice, this bounds the common case)
/// and three numbers. Notices wait until this much fits in half the
/// control slack.
pub const DROPPED_NOTICE_BYTES_MAX: usize = 512;
/// Most bytes gathered into one socket write (one write per wake-up).
/// 256 KiB amortises the syscall without holding a large buffer per
/// connection for long; the buffer shrinks back when the queue is empty.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 << 10;
/// Shard-wide scratch buffer every socket read lands in before its bytes
/// are appended to the connection's own buffer; an idle connection then holds
/// no read buffer at all. 64 KiB lets a busy publisher's read take many
/// frames per syscall.
pub const READ_SCRATCH_BYTES: usize = 64 << 10;

/// Default number of messages retained per topic.
pub const HISTORY_MESSAGES_MAX_DEFAULT: usize = 1024;
/// Default bytes of payload retained per topic.
pub const HISTORY_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default node-wide ceiling on `topics_max * history_bytes_max`, so that a
/// configuration cannot promise more history memory than the operator meant.
pub const HISTORY_MEMORY_MAX_DEFAULT: usize = 4 << 30;

/// Default most topics a node keeps; bounds the topic tables and their
/// history. When the table is full, the least recently active topic that
/// nobody subscribes to is evicted (its history with it; a resume from it
/// later meets a new epoch and is told so); a topic made by a subscribe goes
/// with its last subscriber. Only subscribed topics can fill the table.
pub const TOPICS_MAX_DEFAULT: usize = 4096;
/// Topics in one page of `GET /v1/topics` unless `limit` says otherwise,
/// and the most it may say. A page costs each shard a scan of its topics
/// and the node one JSON body; 1,000 entries is about 200 KB.
pub const TOPICS_PAGE_DEFAULT: usize = 100;
/// See `TOPICS_PAGE_DEFAULT`.
pub const TOPICS_PAGE_MAX: usize = 1000;
/// Default share of each shard's topic table, in percent, that one client
/// address may keep alive by subscribing (topics nobody subscribes to are
/// evicted when room is needed, so only subscriptions can fill a table).
/// A quarter leaves three quarters for everyone else whatever one address
/// does over however many connections; many users behind one NAT address
/// may need more (`--client-topics-share-percent`), or more `topics_max`.
pub const CLIENT_TOPICS_SHARE_PERCENT_DEFAULT: usize = 25;
/// Default most subscriptions one connection may hold (native protocol).
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT: usize = 1024;
/// Default most open client connections per node, every shard together
/// (one count, so a topic socket handed to its owner shard needs no room
/// there). Each shard has a descriptor table of its own, so the open-files
/// limit (20,000 here) applies per shard; the default fits one shard's
/// table with headroom, and a node with more shards may be given more (it
/// warns at start if the limit cannot hold `connections_max`).
pub const CONNECTIONS_MAX_DEFAULT: usize = 16_384;

/// Connections a node at `connections_max` still admits, one request each,
/// for `/healthz`, `/readyz` and `/metrics` only: a full node must not be
/// taken for dead by its balancer or restarted by a liveness probe. Enough
/// for a few balancers' and probes' checks at once; each costs one
/// descriptor and a request head for at most `handshake_timeout_ms`.
pub const ADMIN_CONNECTIONS_RESERVED: usize = 32;

/// Default time a client has to send a complete HTTP request head.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default silence from a WebSocket peer before the server pings it; a
/// second period of silence closes the connection (close code 4001).
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Shortest time between two fan-out writes of a shard while messages keep
/// coming, µs. Each write is one `send` per subscriber with data; on
/// loopback a send costs about the same for one message as for ten, so at
/// 10,000 msg/s x 100 subscribers writing after every pass (about 3
/// messages per send when the subscribers read on one thread) cost 0.87-0.95
/// node CPU-s per million deliveries and 1 ms between writes 0.41, with
/// p50 latency 1.3 ms instead of 1.0 (perf/results/2026-12-02-vm-flush-interval.md).
/// Nothing waits when messages come slower than this.
pub const FLUSH_INTERVAL_US_DEFAULT: u64 = 1_000;

/// Largest `flush_interval_us`: while the fan-out waits, direct-mode queues
/// fill at the topic's rate with nothing draining them, and at 10 ms a
/// subscriber of a 100 MB/s topic already holds 1 MiB of its 4 MiB default
/// queue; beyond that the wait would make fast readers look slow.
pub const FLUSH_INTERVAL_US_MAX: u64 = 10_000;
/// Default time graceful shutdown spends flushing queues before closing.
pub const DRAIN_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Capacity, in batches, of each SPSC channel between two shards. Batches
/// coalesce while a channel is full, so a small ring suffices.
pub const SHARD_CHANNEL_BATCHES: usize = 16;
/// Bytes an owner may have queued toward one peer shard before local
/// publishers wait: bounds the outbox when a peer shard is CPU-starved.
pub const OUTBOX_BYTES_MAX: usize = 4 << 20;

/// Most shards: topic ownership fits a 64-bit subscriber-shard mask.
pub const SHARDS_MAX: usize = 64;

// A full history replay must fit into an empty send queue, or resuming would
// trip the slow-consumer policy by construction.
const _: () = assert!(HISTORY_BYTES_MAX_DEFAULT <= SEND_QUEUE_BYTES_MAX_DEFAULT);
// One message must fit the send queue and one write batch holds at least one
// typical message.
const _: () = assert!(MESSAGE_BYTES_MAX_DEFAULT <= SEND_QUEUE_BYTES_MAX_DEFAULT);
const _: () = assert!(MESSAGE_BYTES_MAX_DEFAULT <= MESSAGE_BYTES_MAX_CEILING);
const _: () = assert!(TOPIC_NAME_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(TOPICS_MAX_DEFAULT * HISTORY_BYTES_MAX_DEFAULT <= HISTORY_MEMORY_MAX_DEFAULT);
// A read can bring a whole maximal request head in one syscall.
const _: () = assert!(HTTP_HEAD_BYTES_MAX <= READ_SCRATCH_BYTES);
// Notices must fit in the half of the control slack they may use.
const _: () = assert!(DROPPED_NOTICE_BYTES_MAX <= CONTROL_SLACK_BYTES / 2);

/// Bytes counted for one cross-shard item besides its payload (headers,
/// topic handle, bookkeeping): keeps many tiny items bounded too.
pub const ITEM_OVERHEAD_BYTES: usize = 128;
/// Payload bytes waiting in one shard's fan-out fill buffers before the
/// shard stops taking batches from its peers (backpressure to publishers).
pub const FANOUT_PENDING_BYTES_MAX: usize = 8 << 20;
/// Bytes of publishes one shard may have in flight to one owner.
pub const REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX: usize = 32 << 20;

// A largest message must fit the in-flight budget, or its publish would wait forever.
const _: () = assert!(MESSAGE_BYTES_MAX_CEILING + ITEM_OVERHEAD_BYTES <= REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX);
