//! Printing results as aligned tables or as JSON.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use proto::admin::{
    LatencyReport, Located, LogMessage, Manifest, NodeList, PublishAnswer, SnapshotList, SnapshotMade, StatusBody,
    TopicInfo, TopicPage,
};
use serde::Serialize;

use crate::Output;

/// Prints rows as columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn durability(t: &TopicInfo) -> String {
    match &t.durable {
        None => "ephemeral".into(),
        Some(d) if d.failed => "durable (FAILED)".into(),
        Some(d) => format!("durable ack={}", d.ack),
    }
}

/// `topics list`.
pub fn topic_page(out: Output, page: &TopicPage) {
    if out == Output::Json {
        return json(page);
    }
    let rows: Vec<Vec<String>> = page
        .topics
        .iter()
        .map(|t| {
            vec![
                t.topic.clone(),
                durability(t),
                format!("{}..{}", t.first_seq, t.last_seq),
                t.subscribers.to_string(),
                t.publish_rate_per_sec.to_string(),
                t.durable.as_ref().map_or("-".into(), |d| d.log_bytes.to_string()),
            ]
        })
        .collect();
    table(&["TOPIC", "KIND", "RETAINED", "SUBSCRIBERS", "MSG/S", "LOG BYTES"], &rows);
    if let Some(next) = &page.next {
        println!("(more: --after {next})");
    }
}

/// `topics show`.
pub fn topic(out: Output, t: &TopicInfo) {
    if out == Output::Json {
        return json(t);
    }
    let mut rows = vec![
        vec!["topic".into(), t.topic.clone()],
        vec!["kind".into(), durability(t)],
        vec!["epoch".into(), t.epoch.clone()],
        vec!["last_seq".into(), t.last_seq.to_string()],
        vec![
            "in memory".into(),
            format!("{}..{} ({} messages, {} bytes)", t.first_seq, t.last_seq, t.retained_messages, t.retained_bytes),
        ],
        vec!["subscribers".into(), t.subscribers.to_string()],
        vec!["publish rate".into(), format!("{}/s", t.publish_rate_per_sec)],
        vec!["owner shard".into(), t.owner_shard.to_string()],
    ];
    if let Some(d) = &t.durable {
        let r = &d.retention;
        let bound = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        rows.push(vec!["log".into(), format!("{}..{}", d.log_first_seq, t.last_seq)]);
        rows.push(vec![
            "on disk".into(),
            format!(
                "{}..{} ({} messages, {} bytes, {} segments)",
                d.local_first_seq, t.last_seq, d.log_messages, d.log_bytes, d.segments
            ),
        ]);
        if d.archived_segments > 0 {
            let before = d.local_first_seq.saturating_sub(1);
            let store = format!(
                "{}..{} ({} bytes, {} segments)",
                d.log_first_seq, before, d.archived_bytes, d.archived_segments
            );
            rows.push(vec!["only in the store".into(), store]);
        }
        rows.push(vec!["keys".into(), d.keys.to_string()]);
        rows.push(vec![
            "retention".into(),
            format!("age {} ms, bytes {}, messages {}", bound(r.max_age_ms), bound(r.max_bytes), bound(r.max_messages)),
        ]);
        rows.push(vec!["waiting for disk".into(), d.unwritten.to_string()]);
    }
    table(&["FIELD", "VALUE"], &rows);
}

/// A `{"status"}` answer.
pub fn status(out: Output, done: &str, status: &StatusBody) {
    match out {
        Output::Json => json(status),
        Output::Table => println!("{done}"),
    }
}

/// Any JSON answer.
pub fn value(out: Output, done: &str, v: &serde_json::Value) {
    match out {
        Output::Json => json(v),
        Output::Table => println!("{done}"),
    }
}

/// `pub`.
pub fn published(out: Output, answer: &PublishAnswer) {
    match out {
        Output::Json => json(answer),
        Output::Table => println!("{} seq {}", answer.topic, answer.seq),
    }
}

/// One message of a log read.
pub fn log_message(out: Output, m: &LogMessage) {
    match out {
        Output::Json => println!("{}", serde_json::to_string(m).unwrap_or_default()),
        Output::Table => {
            let data = m.data.clone().or_else(|| m.data_base64.as_ref().map(|b| format!("base64:{b}")));
            println!("{}\t{}\t{}\t{}", m.seq, m.ts, m.key.as_deref().unwrap_or("-"), data.unwrap_or_default());
        }
    }
}

/// A native text envelope.
pub fn envelope(out: Output, v: &serde_json::Value) {
    match out {
        Output::Json => println!("{v}"),
        Output::Table => println!("{}\t{}\t{}", v["seq"], v["ts"], v["data"].as_str().unwrap_or_default()),
    }
}

/// A native binary envelope: `0x01 | topic_len u8 | topic | seq u64 | ts u64 | payload`.
pub fn binary_envelope(out: Output, bytes: &[u8]) {
    let topic_len = bytes.get(1).copied().unwrap_or(0) as usize;
    let at = 2 + topic_len;
    let number =
        |from: usize| bytes.get(from..from + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
    let (seq, ts) = (number(at), number(at + 8));
    let payload = bytes.get(at + 16..).unwrap_or(&[]);
    match out {
        Output::Json => println!("{}", serde_json::json!({ "seq": seq, "ts": ts, "binary_bytes": payload.len() })),
        Output::Table => println!("{seq}\t{ts}\t<{} bytes binary>", payload.len()),
    }
}

/// A notice on a subscription (`dropped`, ...).
pub fn notice(out: Output, v: &serde_json::Value) {
    match out {
        Output::Json => println!("{v}"),
        Output::Table => eprintln!("fluxctl: {v}"),
    }
}

/// Counters worth showing, with their labels.
const SHOWN: [(&str, &str); 6] = [
    ("fluxnode_connections", "connections"),
    ("fluxnode_subscriptions", "subscriptions"),
    ("fluxnode_topics", "topics"),
    ("fluxnode_messages_published_total", "published"),
    ("fluxnode_messages_delivered_total", "delivered"),
    ("fluxnode_messages_dropped_total", "dropped"),
];

/// `stats --once`.
pub fn totals(out: Output, m: &BTreeMap<String, f64>) {
    let picked: BTreeMap<&str, f64> =
        SHOWN.iter().map(|(name, label)| (*label, m.get(*name).copied().unwrap_or(0.0))).collect();
    match out {
        Output::Json => json(&picked),
        Output::Table => {
            let rows: Vec<Vec<String>> =
                SHOWN.iter().map(|(_, l)| vec![l.to_string(), picked[l].to_string()]).collect();
            table(&["COUNTER", "VALUE"], &rows);
        }
    }
}

/// One refresh of `stats`: rates over `period`, in place on a terminal.
pub fn rates(out: Output, before: &BTreeMap<String, f64>, now: &BTreeMap<String, f64>, period: Duration) {
    let rate = |name: &str| (now.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0)) / period.as_secs_f64();
    let get = |name: &str| now.get(name).copied().unwrap_or(0.0);
    let row = serde_json::json!({
        "published_per_sec": rate("fluxnode_messages_published_total").round(),
        "delivered_per_sec": rate("fluxnode_messages_delivered_total").round(),
        "dropped_per_sec": rate("fluxnode_messages_dropped_total").round(),
        "connections": get("fluxnode_connections"),
        "subscriptions": get("fluxnode_subscriptions"),
        "topics": get("fluxnode_topics"),
        "p99_ms": get("fluxnode_delivery_latency_seconds{quantile=\"0.99\"}") * 1000.0,
    });
    match out {
        Output::Json => println!("{row}"),
        Output::Table => {
            print!(
                "\r\x1b[2Kpublished {}/s  delivered {}/s  dropped {}/s  connections {}  subscriptions {}  topics {}  p99 {:.2} ms",
                row["published_per_sec"], row["delivered_per_sec"], row["dropped_per_sec"], row["connections"],
                row["subscriptions"], row["topics"], row["p99_ms"].as_f64().unwrap_or(0.0)
            );
            let _ = std::io::stdout().flush();
        }
    }
}

/// `latency`: the distribution's usual percentiles, milliseconds.
pub fn latency(out: Output, report: &LatencyReport) {
    let at = |q: f64| report.points.iter().find(|p| p.quantile >= q).or(report.points.last()).map_or(0, |p| p.value_us);
    let picked: Vec<(&str, f64)> = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0)]
        .iter()
        .map(|(name, q)| (*name, at(*q) as f64 / 1e3))
        .collect();
    match out {
        Output::Json => json(report),
        Output::Table => {
            let rows: Vec<Vec<String>> = picked.iter().map(|(q, v)| vec![q.to_string(), format!("{v:.3}")]).collect();
            table(&["PERCENTILE", "MS"], &rows);
            println!("({} deliveries since the node started)", report.count);
        }
    }
}

/// The distribution in HdrHistogram's `.hgrm` text form (values in ms).
pub fn hgrm(report: &LatencyReport) -> String {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for p in &report.points {
        let inverse = if p.quantile < 1.0 { format!("{:.2}", 1.0 / (1.0 - p.quantile)) } else { "inf".into() };
        out.push_str(&format!(
            "{:12.3} {:14.12} {:10} {:>14}\n",
            p.value_us as f64 / 1e3,
            p.quantile,
            p.total_count,
            inverse
        ));
    }
    let max = report.points.last().map_or(0, |p| p.value_us);
    out.push_str(&format!("#[Max = {:12.3}, Total count = {:12}]\n", max as f64 / 1e3, report.count));
    out
}

/// An SVG plot: latency (ms, linear) against percentile on the usual
/// `1/(1-p)` log axis, from p0 to p99.99.
pub fn plot_svg(report: &LatencyReport) -> String {
    let (w, h, margin) = (720.0, 400.0, 60.0);
    let x_of = |q: f64| ((1.0 / (1.0 - q.min(0.9999))).log10() / 4.0) * (w - 2.0 * margin) + margin;
    let max_ms = report.points.iter().map(|p| p.value_us).max().unwrap_or(1).max(1) as f64 / 1e3;
    let y_of = |ms: f64| h - margin - ms / max_ms * (h - 2.0 * margin);
    let path: Vec<String> = report
        .points
        .iter()
        .filter(|p| p.quantile <= 0.9999)
        .map(|p| format!("{:.1},{:.1}", x_of(p.quantile), y_of(p.value_us as f64 / 1e3)))
        .collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"20\">FluxNode delivery latency ({} deliveries), ms by percentile</text>\n",
        report.count
    );
    for (label, q) in [("0%", 0.0), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999), ("99.99%", 0.9999)] {
        let x = x_of(q);
        svg.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{margin}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\">{label}</text>\n",
            h - margin,
            h - margin + 16.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"4\" y=\"{:.1}\">{max_ms:.1} ms</text><text x=\"4\" y=\"{:.1}\">0</text>\n",
        margin,
        h - margin
    ));
    svg.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n</svg>\n",
        path.join(" ")
    ));
    svg
}

/// `topology show`.
pub fn nodes(out: Output, list: &NodeList) {
    if out == Output::Json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.addr.to_string(),
                format!("{:?}", n.health).to_lowercase(),
                if n.draining { "draining".into() } else { "-".into() },
                if n.routable { "yes".into() } else { "no".into() },
                n.connections_current.to_string(),
                format!("{:?}", n.source).to_lowercase(),
            ]
        })
        .collect();
    table(&["NODE", "HEALTH", "DRAIN", "ROUTABLE", "CONNECTIONS", "SOURCE"], &rows);
}

/// One member of a cluster as `topology cluster` shows it.
#[derive(Debug, Serialize)]
pub struct MemberRow {
    /// Its address.
    pub addr: String,
    /// ready, not ready, unreachable.
    pub health: String,
    /// The topology version it acts on.
    pub version: Option<u64>,
    /// Publishes it forwarded to other nodes.
    pub forwarded: Option<u64>,
    /// Messages it received from other nodes for its subscribers.
    pub followed: Option<u64>,
    /// Links to other nodes it lost.
    pub links_lost: Option<u64>,
}

/// `topology cluster`.
pub fn cluster(out: Output, view: &proto::admin::ClusterBody, members: &[MemberRow]) {
    if out == Output::Json {
        return json(&serde_json::json!({ "cluster": view, "members": members }));
    }
    println!("membership {}, version {}, seen from {}", view.membership, view.version, view.node);
    if let (Some(topic), Some(owner)) = (&view.topic, &view.owner) {
        println!("topic {topic} is owned by {owner}");
    }
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| vec![m.addr.clone(), m.health.clone(), n(m.version), n(m.forwarded), n(m.followed), n(m.links_lost)])
        .collect();
    table(&["MEMBER", "HEALTH", "VERSION", "FORWARDED", "FOLLOWED", "LINKS LOST"], &rows);
}

/// `snapshot create`.
pub fn snapshot_made(out: Output, made: &SnapshotMade) {
    match out {
        Output::Json => json(made),
        Output::Table => {
            println!("snapshot {}: {} topics, {} segments, {} bytes", made.id, made.topics, made.segments, made.bytes)
        }
    }
}

/// `snapshot restore`.
pub fn restored(out: Output, id: &str, data_dir: &std::path::Path, done: &objstore::restore::Restored) {
    match out {
        Output::Json => json(&serde_json::json!({
            "snapshot": id,
            "data_dir": data_dir.display().to_string(),
            "topics": done.topics,
            "segments": done.segments,
            "bytes": done.bytes,
            "archived_segments": done.archived,
        })),
        Output::Table => println!(
            "restored snapshot {id} into {}: {} topics, {} segments, {} bytes; {} older segments read from the store",
            data_dir.display(),
            done.topics,
            done.segments,
            done.bytes,
            done.archived
        ),
    }
}

/// `snapshot list`.
pub fn snapshot_list(out: Output, list: &SnapshotList) {
    match out {
        Output::Json => json(list),
        Output::Table => {
            let rows: Vec<Vec<String>> = list.snapshots.iter().map(|id| vec![id.clone()]).collect();
            table(&["SNAPSHOT"], &rows);
        }
    }
}

/// `snapshot show`.
pub fn manifest(out: Output, m: &Manifest) {
    if out == Output::Json {
        return json(m);
    }
    println!("snapshot {} (created at {} ms)", m.id, m.created_ms);
    let rows: Vec<Vec<String>> = m
        .topics
        .iter()
        .map(|t| {
            let first = t.segments.first().map_or(0, |s| s.base_seq);
            let last = t.segments.last().map_or(0, |s| s.last_seq);
            let bytes: u64 = t.segments.iter().map(|s| s.bytes).sum();
            vec![
                t.topic.clone(),
                t.epoch.clone(),
                format!("{first}..{last}"),
                t.segments.len().to_string(),
                bytes.to_string(),
            ]
        })
        .collect();
    table(&["TOPIC", "EPOCH", "SEQUENCES", "SEGMENTS", "BYTES"], &rows);
}

/// `topology locate`.
pub fn located(out: Output, located: &Located) {
    match out {
        Output::Json => json(located),
        Output::Table => println!("{} -> {}", located.topic, located.node),
    }
}
