//! Templates, clones, sessions, snapshots, images, networks, health and metrics.
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::types::{CacheCleared, Health, PoolSize};
use super::{body, created, created_revealed, json, no_content, revealed, ApiError, D, R};
use crate::error::Kind;
use crate::services::images::ImportImage;
use crate::services::pools::CreateClones;
use crate::services::sessions::{CreateSession, ForkSession};
use crate::services::templates::CreateTemplate;

pub(super) async fn health(State(d): D) -> Response {
    let cross = d.sessions.coord_state();
    json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        vms: d.vms.len(),
        sessions: d.sessions.len(),
        s3: d.store.has_remote(),
        host: d.sessions.host.clone(),
        cross_host: cross.0.into(),
        cross_host_refused: cross.1,
        standby: d.vms.standby_counts().into_iter().map(|(m, n)| (m.to_string(), n)).collect(),
    })
}

pub(super) async fn images(State(d): D) -> Response {
    json(d.images.list())
}

pub(super) async fn import_image(State(d): D, b: Bytes) -> R<Response> {
    let req: ImportImage = body(&b)?;
    Ok(created(d.images.import(req).await?))
}

pub(super) async fn list_snapshots(State(d): D) -> R<Response> {
    Ok(json(d.store.list().await?))
}

#[derive(Deserialize)]
pub(super) struct DeleteQuery {
    #[serde(default)]
    remote: bool,
}

pub(super) async fn delete_snapshot(State(d): D, Path(id): Path<String>, Query(q): Query<DeleteQuery>) -> R<Response> {
    d.delete_snapshot(&id, q.remote).await?;
    Ok(no_content())
}

pub(super) async fn push_snapshot(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.store.publish(&id).await?))
}

pub(super) async fn pull_snapshot(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.store.pull(&id).await?))
}

pub(super) async fn list_templates(State(d): D) -> R<Response> {
    Ok(json(d.templates.list()?))
}

pub(super) async fn create_template(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateTemplate = body(&b)?;
    Ok(created(d.create_template(req).await?))
}

pub(super) async fn set_pool(State(d): D, Path(name): Path<String>, b: Bytes) -> R<Response> {
    let req: PoolSize = body(&b)?;
    Ok(json(d.pools.set_size(&name, req.size).await?))
}

pub(super) async fn delete_template(State(d): D, Path(name): Path<String>) -> R<Response> {
    d.delete_template(&name).await?;
    Ok(no_content())
}

pub(super) async fn clones(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateClones = body(&b)?;
    Ok(created_revealed(d.pools.clones(req).await?))
}

pub(super) async fn get_network(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.network.view(&id)?))
}

/// Replaces the egress policy of a VM or session (its running VM's at once).
pub(super) async fn set_egress(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let policy: crate::net::EgressPolicy = body(&b)?;
    Ok(json(d.network.set_egress(&id, policy).await?))
}

pub(super) async fn expose_port(State(d): D, Path((id, port)): Path<(String, u16)>, b: Bytes) -> R<Response> {
    let e: crate::net::ExposedPort = body(&b)?;
    Ok(revealed(d.network.set_port(&id, port, Some(e)).await?))
}

pub(super) async fn hide_port(State(d): D, Path((id, port)): Path<(String, u16)>) -> R<Response> {
    Ok(json(d.network.set_port(&id, port, None).await?))
}

/// `GET /v1/sessions?metadata.KEY=VALUE...&limit=N&after=CURSOR`: sessions whose metadata has every pair,
/// oldest first; with `limit`, one page, and `Flint-Next-After` names where the next one starts if any is left.
pub(super) async fn list_sessions(
    State(d): D,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> R<Response> {
    use crate::services::sessions::{BadCursor, Page, MAX_PAGE, NEXT_AFTER};
    let mut filter = std::collections::BTreeMap::new();
    let mut page = Page::default();
    for (k, v) in q {
        match (k.as_str(), k.strip_prefix("metadata.")) {
            ("limit", _) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => page.limit = Some(n),
                _ => return Err(ApiError::new(Kind::Invalid, format!("limit `{v}`: a number from 1 to {MAX_PAGE}"))),
            },
            ("after", _) => {
                page.after = Some(v.parse().map_err(|e: BadCursor| ApiError::new(Kind::Invalid, e.to_string()))?)
            }
            (_, Some(key)) if !key.is_empty() => {
                filter.insert(key.to_string(), v);
            }
            _ => {
                return Err(ApiError::new(
                    Kind::Invalid,
                    format!("unknown query parameter `{k}` (metadata.KEY=VALUE, limit, after)"),
                ))
            }
        }
    }
    let (list, next) = d.sessions.page(&filter, &page);
    let mut resp = json(list);
    if let Some(v) = next.and_then(|c| axum::http::HeaderValue::from_str(&c.to_string()).ok()) {
        resp.headers_mut().insert(NEXT_AFTER, v);
    }
    Ok(resp)
}

pub(super) async fn create_session(State(d): D, b: Bytes) -> R<Response> {
    let req: CreateSession = body(&b)?;
    Ok(created_revealed(d.sessions.create(req).await?))
}

pub(super) async fn get_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.sessions.get(&id).await?))
}

pub(super) async fn delete_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    d.sessions.delete(&id).await?;
    Ok(no_content())
}

pub(super) async fn hibernate_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.sessions.hibernate(&id).await?))
}

pub(super) async fn drain_host(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.sessions.drain(&id, true).await?))
}

pub(super) async fn undrain_host(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.sessions.drain(&id, false).await?))
}

pub(super) async fn wake_session(State(d): D, Path(id): Path<String>) -> R<Response> {
    Ok(json(d.sessions.wake(&id).await?))
}

pub(super) async fn fork_session(State(d): D, Path(id): Path<String>, b: Bytes) -> R<Response> {
    let req: ForkSession = body(&b)?;
    Ok(created_revealed(d.sessions.fork(&id, req).await?))
}

/// Drops every unpinned chunk from the local cache (manifests stay): the next restore fetches from S3.
pub(super) async fn clear_cache(State(d): D) -> R<Response> {
    let n = d.store.clear_local_chunks()?;
    Ok(json(CacheCleared { deleted_chunks: n }))
}

/// `POST /v1/e2b/keys`: a new E2B API key, shown in this answer only.
pub(super) async fn create_e2b_key(State(d): D, b: Bytes) -> R<Response> {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct NewKey {
        name: String,
    }
    let req: NewKey = body(&b)?;
    if req.name.len() > 128 {
        return Err(ApiError::new(Kind::Invalid, "a key's name is at most 128 characters"));
    }
    let k = d.e2b.keys.create(&req.name).map_err(|e| ApiError::new(Kind::Internal, e.to_string()))?;
    Ok(created_revealed(k))
}

pub(super) async fn list_e2b_keys(State(d): D) -> R<Response> {
    Ok(json(d.e2b.keys.list().map_err(|e| ApiError::new(Kind::Internal, e.to_string()))?))
}

pub(super) async fn delete_e2b_key(State(d): D, Path(id): Path<String>) -> R<Response> {
    match d.e2b.keys.remove(&id).map_err(|e| ApiError::new(Kind::Internal, e.to_string()))? {
        true => Ok(no_content()),
        false => Err(ApiError::new(Kind::NotFound, format!("no E2B key `{id}`"))),
    }
}

pub(super) async fn metrics(State(d): D) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render(&d)).into_response()
}

/// `/v1/e2b/fleet/{rest}`: an E2B call `flint-router` forwards (the API key checked by the router).
pub(super) async fn e2b_from_router(State(d): D, req: axum::extract::Request) -> Response {
    crate::e2b::dispatch_from_router(d.e2b.clone(), req).await
}
