//! `EtcdStore`: the production `TopologyStore`, on etcd v3 through `etcd-client`.
//!
//! Create-if-absent is a txn on `create_revision == 0`, an update a txn on `mod_revision`;
//! watches ask for `prev_kv` and start at the caller's revision; a compacted start or a watch
//! that etcd cancels for compaction becomes `StoreError::Compacted`. TTLs are whole seconds in
//! etcd, so a lease's TTL is rounded up (and etcd may raise it to its minimum, about 2 s).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::stream::{self, StreamExt};

use crate::store::{
    Fence, KeyValue, LeaseId, Revision, StoreError, TopologyStore, WatchEvent, WatchStream,
};
use crate::tls::Tls;

/// The etcd-backed store. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// The endpoints as given, joined by commas, for error messages.
    endpoint: String,
    /// Bound on each unary call, so that a partitioned store fails a call instead of hanging it.
    request_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`, or `host:port`) and
    /// checks that it answers within `connect_timeout`.
    pub async fn connect(
        endpoints: &[String],
        connect_timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, connect_timeout, None).await
    }

    /// [`connect`](Self::connect), over mutual TLS with `tls` when it is given: the endpoints
    /// must then be `https://` URLs, and etcd must trust the CA of our certificate.
    pub async fn connect_with(
        endpoints: &[String],
        connect_timeout: Duration,
        tls: Option<&Tls>,
    ) -> Result<Self, StoreError> {
        let endpoint = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(StoreError::Unreachable {
                endpoint,
                message: "no etcd endpoint given".into(),
            });
        }
        if let Some(wrong) = endpoints
            .iter()
            .find(|e| tls.is_some() != e.starts_with("https://"))
        {
            let message = if tls.is_some() {
                "with TLS configured, every etcd endpoint must be an https:// URL"
            } else {
                "an https:// endpoint needs TLS: give --tls-cert, --tls-key and --tls-ca"
            };
            return Err(StoreError::Unreachable {
                endpoint: wrong.clone(),
                message: message.into(),
            });
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            // HTTP/2 pings notice a dead connection under a long-lived watch.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls {
            options = options.with_tls(tls.etcd());
        }
        let unreachable = |message: String| StoreError::Unreachable {
            endpoint: endpoint.clone(),
            message,
        };
        let mut client =
            tokio::time::timeout(connect_timeout, Client::connect(endpoints, Some(options)))
                .await
                .map_err(|_| unreachable(format!("no answer within {connect_timeout:?}")))?
                .map_err(|e| unreachable(e.to_string()))?;
        // The channel connects lazily; ask for the status so a wrong address fails here.
        tokio::time::timeout(connect_timeout, client.status())
            .await
            .map_err(|_| unreachable(format!("no answer within {connect_timeout:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Self {
            client,
            endpoint,
            request_timeout: connect_timeout.max(Duration::from_secs(5)),
        })
    }

    /// The underlying client, for operations the trait does not cover (compaction in tests,
    /// diagnostics).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn error(&self, err: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
        let message = err.to_string();
        if let Some(lease) = lease {
            if message.contains("lease not found") {
                return StoreError::LeaseLost(lease);
            }
        }
        if message.contains("required revision has been compacted") {
            // etcd does not say which revision in this message; 0 stands for "unknown".
            return StoreError::Compacted(0);
        }
        StoreError::Unreachable {
            endpoint: self.endpoint.clone(),
            message,
        }
    }

    /// Runs one unary call with the request timeout and maps its error.
    async fn call<T>(
        &self,
        lease: Option<LeaseId>,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(result) => result.map_err(|e| self.error(e, lease)),
            Err(_) => Err(StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: format!("no answer within {:?}", self.request_timeout),
            }),
        }
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|id| PutOptions::new().with_lease(id))
}

#[async_trait]
impl TopologyStore for EtcdStore {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let resp = self.call(None, client.lease_grant(secs, None)).await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // One request on a short-lived keep-alive stream: the keeper rejects a lease whose TTL
        // came back as 0 (expired) with "lease not found".
        let mut client = self.client.clone();
        self.call(Some(lease), client.lease_keep_alive(lease))
            .await
            .map(drop)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.call(Some(lease), client.lease_revoke(lease))
            .await
            .map(drop)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let mut client = self.client.clone();
        let resp = self
            .call(lease, client.put(key, value, put_options(lease)))
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut client = self.client.clone();
        let resp = self.call(None, client.get(key, None)).await?;
        Ok(resp.kvs().first().map(convert))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut client = self.client.clone();
        let resp = self
            .call(
                None,
                client.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        // etcd returns a range sorted by key.
        Ok((resp.kvs().iter().map(convert).collect(), revision))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let compare = if expected == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, expected)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, put_options(lease))]);
        let mut client = self.client.clone();
        let resp = self.call(lease, client.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    async fn compare_and_swap_fenced(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let compare = if expected == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, expected)
        };
        // A missing fence key compares as lease 0, which no granted lease is.
        let fenced = Compare::lease(fence.key.as_str(), CompareOp::Equal, fence.lease);
        let txn = Txn::new()
            .when([compare, fenced])
            .and_then([TxnOp::put(key, value, None)]);
        let mut client = self.client.clone();
        let resp = self.call(None, client.txn(txn)).await?;
        Ok(resp.succeeded())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.call(None, client.delete(key, None)).await.map(drop)
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(from.max(0));
        let mut client = self.client.clone();
        let inner = self.call(None, client.watch(prefix, Some(options))).await?;
        let this = self.clone();
        // State: the etcd stream, and whether it ended (after an error or a cancel).
        let events = stream::unfold(Some(inner), move |state| {
            let this = this.clone();
            async move {
                let mut inner = state?;
                loop {
                    match inner.next().await {
                        None => return None,
                        Some(Err(e)) => return Some((vec![Err(this.error(e, None))], None)),
                        Some(Ok(resp)) => {
                            if resp.canceled() {
                                let err = if resp.compact_revision() > 0 {
                                    StoreError::Compacted(resp.compact_revision())
                                } else {
                                    StoreError::Other(format!(
                                        "etcd cancelled the watch: {}",
                                        resp.cancel_reason()
                                    ))
                                };
                                return Some((vec![Err(err)], None));
                            }
                            let events: Vec<_> = resp
                                .events()
                                .iter()
                                .filter_map(|e| {
                                    let kv = e.kv()?;
                                    Some(Ok(match e.event_type() {
                                        EventType::Put => WatchEvent::Put(convert(kv)),
                                        EventType::Delete => WatchEvent::Delete {
                                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                                            revision: kv.mod_revision(),
                                            prev: e.prev_kv().map(convert),
                                        },
                                    }))
                                })
                                .collect();
                            // Created and progress responses carry no events.
                            if !events.is_empty() {
                                return Some((events, Some(inner)));
                            }
                        }
                    }
                }
            }
        });
        Ok(events.flat_map(stream::iter).boxed())
    }
}
