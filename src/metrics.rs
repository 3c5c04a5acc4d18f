//! Every metric berth exports, in one place. Labels are bounded: never a repository, tag or
//! digest.

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge, register_int_gauge_vec, Encoder,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, TextEncoder,
};
use std::sync::LazyLock;
use std::time::Duration;

pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_http_requests_total", "Requests answered, by method, route and status", &["method", "route", "code"])
        .unwrap()
});
pub static HTTP_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "berth_http_request_duration_seconds",
        "Time to answer a request, by route",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    )
    .unwrap()
});
pub static REPLICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_replication_total",
        "Replication steps (a copy or a delete at a target) by result: ok, or retry after a failure",
        &["result"]
    )
    .unwrap()
});
pub static CACHE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_cache_requests_total", "Mirror lookups by kind and result", &["kind", "result"]).unwrap()
});
pub static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_upstream_requests_total", "Requests sent upstream, by upstream and status", &["upstream", "code"])
        .unwrap()
});
pub static UPSTREAM_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!("berth_upstream_request_duration_seconds", "Upstream response time to headers", &["upstream"]).unwrap()
});
pub static UPSTREAM_BYTES: LazyLock<IntCounterVec> =
    LazyLock::new(|| register_int_counter_vec!("berth_upstream_bytes_total", "Body bytes fetched from upstreams", &["upstream"]).unwrap());
pub static SERVED_BYTES: LazyLock<IntCounterVec> =
    LazyLock::new(|| register_int_counter_vec!("berth_served_bytes_total", "Body bytes served, by source", &["source"]).unwrap());
pub static FILLS_IN_FLIGHT: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("berth_fills_in_flight", "Upstream blob fills in progress").unwrap());
pub static FILLS_UNCACHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("berth_fills_uncached_total", "Fills that could not be written to disk (full) and streamed to clients uncached")
        .unwrap()
});
pub static DIGEST_MISMATCH: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_digest_mismatch_total", "Content whose digest did not verify, never cached", &["source"]).unwrap()
});
pub static STORE_BYTES: LazyLock<IntGaugeVec> =
    LazyLock::new(|| register_int_gauge_vec!("berth_store_bytes", "Bytes in the store by class", &["class"]).unwrap());
pub static UPLOADS_IN_PROGRESS: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("berth_uploads_in_progress", "Open upload sessions").unwrap());
pub static RATELIMIT_REMAINING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "berth_upstream_ratelimit_remaining",
        "Pulls left as the upstream's ratelimit-remaining header says",
        &["upstream"]
    )
    .unwrap()
});
pub static AUTH_REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_auth_rejected_total",
        "Credentials refused, by reason: bad_credentials, invalid_token, throttled",
        &["reason"]
    )
    .unwrap()
});
pub static STALE_SERVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_stale_served_total", "Cached tags served while the upstream failed", &["upstream"]).unwrap()
});
pub static UPSTREAM_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("berth_upstream_state", "Each upstream's circuit: 0 closed, 1 probing, 2 open (failing fast)", &["upstream"])
        .unwrap()
});
pub static PULLS_SPENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_upstream_pulls_spent_total",
        "Manifest GETs sent upstream (what registries count as pulls)",
        &["upstream"]
    )
    .unwrap()
});
pub static PULLS_SAVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_upstream_pulls_saved_total",
        "Manifest GETs not sent because the pull budget was at its reserve and a cached answer existed",
        &["upstream"]
    )
    .unwrap()
});
pub static PREFETCH_IMAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_prefetch_images_total",
        "Prefetched images (tags) by upstream and result: ok, failed (retried with backoff), paused (pull budget at its reserve)",
        &["upstream", "result"]
    )
    .unwrap()
});
pub static PREFETCH_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_prefetch_bytes_total", "Blob bytes prefetching fetched from upstream", &["upstream"]).unwrap()
});
pub static PREFETCH_LAST_RUN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "berth_prefetch_last_run_timestamp_seconds",
        "When the last prefetch run that fetched every image ended (Unix time; 0: none yet)",
        &["upstream"]
    )
    .unwrap()
});
pub static WATCHED_TAGS: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("berth_watched_tags", "Pulled tags checked at their TTL (within watch_window)").unwrap());
pub static WATCH_REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_watch_refreshes_total",
        "Watched tags the upstream moved, by result: warmed (new content fetched), failed, paused (pull budget at its reserve)",
        &["upstream", "result"]
    )
    .unwrap()
});
pub static WATCH_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_watch_bytes_total", "Blob bytes fetched for watched tags that moved upstream", &["upstream"]).unwrap()
});
pub static STORAGE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_storage_requests_total", "Object storage (S3) requests, by operation and result", &["op", "result"])
        .unwrap()
});
pub static STORAGE_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "berth_storage_request_duration_seconds",
        "Object storage (S3) request time, retries included",
        &["op"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .unwrap()
});
pub static STORAGE_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_storage_bytes_total", "Bytes moved to and from object storage, by direction", &["direction"]).unwrap()
});
pub static HOT_TIER: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_hot_tier_reads_total", "Blob reads with S3 storage, by whether a local copy served them", &["result"])
        .unwrap()
});
pub static HOT_TIER_BYTES: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("berth_hot_tier_bytes", "Bytes of local copies of bucket objects").unwrap());
pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_connections_refused_total", "Connections answered 503 at a connection cap, by cap", &["cap"]).unwrap()
});
pub static WEBHOOK_DELIVERED: LazyLock<IntCounter> =
    LazyLock::new(|| register_int_counter!("berth_webhook_delivered_total", "Events a webhook took (2xx)").unwrap());
pub static WEBHOOK_RETRIED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("berth_webhook_retried_total", "Webhook deliveries that failed and are tried again later").unwrap()
});
pub static WEBHOOK_DEAD: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("berth_webhook_dead_total", "Events a webhook did not take within its max_age, now dead letters").unwrap()
});
pub static WEBHOOK_QUEUE_AGE: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    prometheus::register_gauge!("berth_webhook_queue_age_seconds", "Age of the oldest event this node has yet to deliver").unwrap()
});
pub static BUILD_INFO: LazyLock<IntGaugeVec> =
    LazyLock::new(|| register_int_gauge_vec!("berth_build_info", "berth version", &["version"]).unwrap());

/// `code` values of `berth_upstream_requests_total` that exist (at 0) from the start for every
/// upstream.
const UPSTREAM_CODES_AT_START: [&str; 4] = ["200", "429", "timeout", "error"];

/// Touches every metric so each appears in /metrics from the start, labelled ones with the
/// label values berth knows in advance.
pub fn init(upstreams: &[String]) {
    // Series that exist from the start, so dashboards show zero rather than no data.
    crate::cluster::init_metrics();
    for op in ["get", "put"] {
        STORAGE_REQUESTS.with_label_values(&[op, "ok"]);
        STORAGE_DURATION.with_label_values(&[op]);
    }
    for dir in ["in", "out"] {
        STORAGE_BYTES.with_label_values(&[dir]);
    }
    for r in ["hit", "miss"] {
        HOT_TIER.with_label_values(&[r]);
    }
    HOT_TIER_BYTES.set(0);
    BUILD_INFO.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    for kind in ["manifest", "blob"] {
        for result in ["hit", "miss", "stale", "coalesced"] {
            CACHE_REQUESTS.with_label_values(&[kind, result]);
        }
    }
    for s in ["cache", "upstream", "hosted"] {
        SERVED_BYTES.with_label_values(&[s]);
    }
    for s in ["manifest", "blob"] {
        DIGEST_MISMATCH.with_label_values(&[s]);
    }
    for c in ["cache", "hosted"] {
        STORE_BYTES.with_label_values(&[c]);
    }
    for r in ["bad_credentials", "invalid_token", "throttled"] {
        AUTH_REJECTED.with_label_values(&[r]);
    }
    for u in upstreams {
        UPSTREAM_BYTES.with_label_values(&[u]);
        UPSTREAM_DURATION.with_label_values(&[u]);
        STALE_SERVED.with_label_values(&[u]);
        UPSTREAM_STATE.with_label_values(&[u]).set(0);
        PULLS_SPENT.with_label_values(&[u]);
        PULLS_SAVED.with_label_values(&[u]);
        for r in ["ok", "failed", "paused"] {
            PREFETCH_IMAGES.with_label_values(&[u.as_str(), r]);
        }
        for r in ["warmed", "failed", "paused"] {
            WATCH_REFRESHES.with_label_values(&[u.as_str(), r]);
        }
        PREFETCH_BYTES.with_label_values(&[u]);
        PREFETCH_LAST_RUN.with_label_values(&[u]).set(0);
        WATCH_BYTES.with_label_values(&[u]);
        // The codes the dashboard's upstream panels select: success, rate limiting, and the two
        // failures that carry no status. Other statuses appear when an upstream first sends them.
        for code in UPSTREAM_CODES_AT_START {
            UPSTREAM_REQUESTS.with_label_values(&[u.as_str(), code]);
        }
        // No RATELIMIT_REMAINING series until the upstream sends the header: a 0 there would
        // read as "no pulls left", and many upstreams never announce a limit at all.
    }
    LazyLock::force(&FILLS_IN_FLIGHT);
    LazyLock::force(&WATCHED_TAGS);
    LazyLock::force(&FILLS_UNCACHED);
    LazyLock::force(&UPLOADS_IN_PROGRESS);
    LazyLock::force(&WEBHOOK_DELIVERED);
    LazyLock::force(&WEBHOOK_RETRIED);
    LazyLock::force(&WEBHOOK_DEAD);
    LazyLock::force(&WEBHOOK_QUEUE_AGE);
    HTTP_REQUESTS.with_label_values(&["GET", "base", "200"]);
    HTTP_DURATION.with_label_values(&["base"]);
}

pub fn record_request(method: &str, route: &'static str, status: u16, elapsed: Duration) {
    let route = if route.is_empty() { "other" } else { route };
    let method = match method {
        "GET" | "HEAD" | "PUT" | "POST" | "PATCH" | "DELETE" => method,
        _ => "OTHER",
    };
    let mut buf = itoa::Buffer::new();
    HTTP_REQUESTS.with_label_values(&[method, route, buf.format(status)]).inc();
    HTTP_DURATION.with_label_values(&[route]).observe(elapsed.as_secs_f64());
}

pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&prometheus::gather(), &mut out).expect("metrics encode");
    String::from_utf8(out).expect("metrics are utf-8")
}
