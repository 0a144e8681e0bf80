//! The worker's Prometheus metrics: the engine's steps, sequences and KV cache, the
//! expert-parallel exchange, the epoch and its switches, and the tokens routed per expert.
//!
//! The hot path only touches handles resolved once (an atomic add, or a histogram's
//! uncontended lock, per step and per exchange); the tokens per expert are not counted twice:
//! the collector reads the engine's own [`ExpertLoad`] counters when Prometheus scrapes.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::model::ExpertLoad;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn rows_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

fn exchange_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Handles for one all-to-all operation of the MoE block.
#[derive(Debug, Clone)]
pub struct ExchangeMetrics {
    pub bytes: Counter,
    pub seconds: Histogram,
}

/// The worker's metrics; clones share their values.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    pub step_seconds: Histogram,
    pub prefill_rows: Histogram,
    pub decode_rows: Histogram,
    pub prefill_tokens: Counter,
    pub decode_tokens: Counter,
    pub active: Gauge,
    pub queued: Gauge,
    pub kv_cache_bytes: Gauge,
    /// The rank's KV cache budget, and the tokens its sequences' blocks of it hold.
    pub kv_cache_capacity_tokens: Gauge,
    pub kv_cache_used_tokens: Gauge,
    pub preemptions: Counter,
    pub dispatch: ExchangeMetrics,
    pub combine: ExchangeMetrics,
    pub epoch: Gauge,
    pub rank: Gauge,
    pub epoch_switch_pause: Histogram,
    pub collective_failures: Counter,
    /// The counters the expert collector reads: the running worker's.
    expert_load: Arc<Mutex<Option<Arc<ExpertLoad>>>>,
    families: Families,
}

#[derive(Debug, Clone)]
struct Families {
    step_rows: HistogramFamily<Kind>,
    tokens: Family<Kind, Counter>,
    sequences: Family<State, Gauge>,
    alltoall_bytes: Family<Op, Counter>,
    alltoall_seconds: HistogramFamily<Op>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let families = Families {
            step_rows: Family::new_with_constructor(rows_histogram),
            tokens: Family::default(),
            sequences: Family::default(),
            alltoall_bytes: Family::default(),
            alltoall_seconds: Family::new_with_constructor(exchange_histogram),
        };
        let kind = |k| Kind { kind: k };
        let op = |o| Op { op: o };
        let exchange = |o| ExchangeMetrics {
            bytes: families.alltoall_bytes.get_or_create_owned(&op(o)),
            seconds: families.alltoall_seconds.get_or_create_owned(&op(o)),
        };
        Self {
            step_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            prefill_rows: families.step_rows.get_or_create_owned(&kind("prefill")),
            decode_rows: families.step_rows.get_or_create_owned(&kind("decode")),
            prefill_tokens: families.tokens.get_or_create_owned(&kind("prefill")),
            decode_tokens: families.tokens.get_or_create_owned(&kind("decode")),
            active: families
                .sequences
                .get_or_create_owned(&State { state: "active" }),
            queued: families
                .sequences
                .get_or_create_owned(&State { state: "queued" }),
            kv_cache_bytes: Gauge::default(),
            kv_cache_capacity_tokens: Gauge::default(),
            kv_cache_used_tokens: Gauge::default(),
            preemptions: Counter::default(),
            dispatch: exchange("dispatch"),
            combine: exchange("combine"),
            epoch: Gauge::default(),
            rank: Gauge::default(),
            epoch_switch_pause: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            collective_failures: Counter::default(),
            expert_load: Arc::default(),
            families,
        }
    }
}

impl WorkerMetrics {
    /// Metrics registered into `registry` under `worker_`, labelled with the worker's `id`.
    /// With `per_layer`, the routed tokens are also exported per (MoE layer, expert): layers
    /// times experts series, so only where asked.
    pub fn register(registry: &mut Registry, id: &str, per_layer: bool) -> Self {
        let m = Self::default();
        let f = &m.families;
        let r = registry.sub_registry_with_label(("worker".into(), id.to_string().into()));
        r.register(
            "worker_step_duration_seconds",
            "Duration of one engine step of this rank (attention, MoE exchange, sampling)",
            m.step_seconds.clone(),
        );
        r.register(
            "worker_step_rows",
            "Rows (tokens) in one step, by kind: prompt tokens prefilled, or sequences decoded",
            f.step_rows.clone(),
        );
        r.register(
            "worker_tokens",
            "Tokens this rank ran through the model, by kind (prefill, decode)",
            f.tokens.clone(),
        );
        r.register(
            "worker_sequences",
            "Sequences on this rank: active (decoding) and queued (waiting for or in prefill)",
            f.sequences.clone(),
        );
        r.register(
            "worker_kv_cache_bytes",
            "Bytes of KV cache the rank's sequences hold",
            m.kv_cache_bytes.clone(),
        );
        r.register(
            "worker_kv_cache_capacity_tokens",
            "Tokens of KV cache the rank's sequences may hold together (its budget)",
            m.kv_cache_capacity_tokens.clone(),
        );
        r.register(
            "worker_kv_cache_used_tokens",
            "Tokens of the KV cache budget the rank's sequences hold, in whole blocks of 16",
            m.kv_cache_used_tokens.clone(),
        );
        r.register(
            "worker_preemptions",
            "Sequences that gave up their KV cache to older ones and prefill again later",
            m.preemptions.clone(),
        );
        r.register(
            "worker_alltoall_bytes",
            "Bytes this rank sent in the MoE all-to-all, by op (dispatch, combine)",
            f.alltoall_bytes.clone(),
        );
        r.register(
            "worker_alltoall_duration_seconds",
            "Duration of one MoE all-to-all of this rank, by op (dispatch, combine)",
            f.alltoall_seconds.clone(),
        );
        r.register(
            "worker_epoch",
            "The epoch this rank has installed (0 before the first)",
            m.epoch.clone(),
        );
        r.register(
            "worker_rank",
            "This worker's rank in its epoch",
            m.rank.clone(),
        );
        r.register(
            "worker_epoch_switch_pause_seconds",
            "Time the rank did not step while its group changed epoch (from the agreed pause, or the failure, to the resume)",
            m.epoch_switch_pause.clone(),
        );
        r.register(
            "worker_collective_failures",
            "Collectives of this rank's EP group that failed (a peer died, hung or left)",
            m.collective_failures.clone(),
        );
        r.register_collector(Box::new(ExpertCollector {
            load: Arc::clone(&m.expert_load),
            per_layer,
        }));
        m
    }

    /// Exports the routed tokens counted by `load` from now on (a worker's model is built).
    pub fn follow_expert_load(&self, load: Arc<ExpertLoad>) {
        *self
            .expert_load
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(load);
    }
}

#[derive(Debug)]
struct ExpertCollector {
    load: Arc<Mutex<Option<Arc<ExpertLoad>>>>,
    per_layer: bool,
}

impl Collector for ExpertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(load) = self
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let counts = load.snapshot();
        let experts = load.experts();
        let mut metric = encoder.encode_descriptor(
            "worker_expert_routed_tokens",
            "Tokens this worker's sequences routed to each logical expert, summed over the MoE layers",
            None,
            MetricType::Counter,
        )?;
        for e in 0..experts {
            let total: u64 = counts.iter().map(|layer| layer[e]).sum();
            let expert = e.to_string();
            ConstCounter::new(total)
                .encode(metric.encode_family(&[("expert", expert.as_str())])?)?;
        }
        if self.per_layer {
            let mut metric = encoder.encode_descriptor(
                "worker_expert_layer_routed_tokens",
                "Tokens this worker's sequences routed to each logical expert, per MoE layer",
                None,
                MetricType::Counter,
            )?;
            for (l, layer) in counts.iter().enumerate() {
                let layer_label = l.to_string();
                for (e, &count) in layer.iter().enumerate() {
                    let expert = e.to_string();
                    let labels = [("layer", layer_label.as_str()), ("expert", expert.as_str())];
                    ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn routed_tokens_are_summed_over_layers_and_per_layer_only_when_asked() {
        let text = |per_layer| {
            let mut registry = moebius_coordinator::telemetry::registry();
            let metrics = WorkerMetrics::register(&mut registry, "w1", per_layer);
            let load = Arc::new(ExpertLoad::new(2, 3));
            load.add(0, &[1, 0, 2]);
            load.add(1, &[4, 0, 0]);
            metrics.follow_expert_load(load);
            metrics.decode_tokens.inc_by(5);
            let mut body = String::new();
            encode(&mut body, &registry).expect("encodes");
            body
        };
        let body = text(false);
        for line in [
            r#"moebius_worker_expert_routed_tokens_total{worker="w1",expert="0"} 5"#,
            r#"moebius_worker_expert_routed_tokens_total{worker="w1",expert="1"} 0"#,
            r#"moebius_worker_expert_routed_tokens_total{worker="w1",expert="2"} 2"#,
            r#"moebius_worker_tokens_total{worker="w1",kind="decode"} 5"#,
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
        }
        assert!(!body.contains("expert_layer_routed"), "{body}");
        let body = text(true);
        let line = r#"moebius_worker_expert_layer_routed_tokens_total{worker="w1",layer="1",expert="0"} 4"#;
        assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
    }
}
