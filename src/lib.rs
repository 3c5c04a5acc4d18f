//! berth: a pull-through caching proxy for container registries that is also the
//! authoritative registry for private namespaces.
//!
//! ```text
//! client ──► http (pingora, thin) ──► registry::Registry::handle
//!                                        │ /token: berth's token service (auth: htpasswd, ES256 JWTs)
//!                                        │ /ui/: web pages over the index (ui; sessions from the same htpasswd)
//!                                        │ resolve: ?ns= / host prefix / hosted namespace / default upstream
//!                                        │ authorize (with [auth]): caller's pull/push on that repository, else 401
//!                                        ├─► hosted: uploads, manifest PUT checks ──► store
//!                                        └─► mirror: digest hit ──► store
//!                                                    miss ──► fill (one upstream fetch per digest,
//!                                                             every client streams the growing file)
//!                                                             ──► upstream client (tokens, redirects)
//! ```
//! `oci` is the pure protocol; `store` never sees pingora; `upstream` never sees the server;
//! `auth` decides who may do what without knowing HTTP.

pub mod auth;
pub mod bundle;
pub mod cluster;
pub mod config;
pub mod events;
pub mod fill;
pub mod http;
pub mod maintenance;
pub mod metrics;
pub mod oci;
pub mod ops;
pub mod registry;
pub mod replicate;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod ui;
pub mod upstream;
