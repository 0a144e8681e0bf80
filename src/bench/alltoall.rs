//! `moebius bench alltoall`: the communicator alone, on MoE-shaped dispatch and combine
//! exchanges, against a raw TCP baseline of the same bytes between the same endpoints.
//!
//! Ranks are threads of this process. Each rank routes `--tokens` tokens to `--topk` distinct
//! experts drawn at random (seeded); the experts are split evenly over the ranks
//! ([`Placement::even`]). Dispatch sends every token copy to the rank of its expert in the
//! engine's wire format (`[count u32][slot u32 × count][rows f32 × count × hidden]`), combine
//! sends the rows back (`f32 × count × hidden`). Only the `all_to_all_v` calls are timed.
//!
//! Bandwidth is DeepEP's "algorithm bandwidth": the bytes one rank sends to *other* ranks in one
//! exchange (mean over ranks), divided by the exchange's latency. An exchange's latency runs from
//! the first rank entering the call to the last rank leaving it (all ranks start together at a
//! barrier). The raw baseline writes the same number of bytes for every ordered pair of ranks
//! over its own plain `TcpStream` (one writer and one reader thread per pair, so writes and
//! reads overlap), timed the same way; the raw round trip is a ping-pong of rank 0's message to
//! rank 1 between the two.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Barrier;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use moebius_coordinator::Placement;
use moebius_worker::comm::{local_group, tcp_group_localhost_with, ClusterSecret, Communicator};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::serve::Dist;

/// Flags of `moebius bench alltoall`.
#[derive(Args, Debug)]
pub struct AlltoallArgs {
    /// EP ranks (threads of this process).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Communicator backend.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    transport: Transport,
    /// Tokens per rank, comma-separated: one measurement per value (decode: 1–16, prefill:
    /// 1024 and up).
    #[arg(long, default_value = "1,16,1024", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Hidden size: each token copy carries hidden × 4 bytes (f32).
    #[arg(long, default_value_t = 7168)]
    hidden: usize,
    /// Experts per token (distinct).
    #[arg(long, default_value_t = 8)]
    topk: usize,
    /// Routed experts, split evenly over the ranks.
    #[arg(long, default_value_t = 256)]
    experts: usize,
    /// Timed exchanges per size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed exchanges before them.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Routing seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// Threads joined by channels.
    Local,
    /// A full mesh of loopback TCP connections.
    Tcp,
    /// The same mesh, every connection proving a (random) cluster secret before its first
    /// frame and sealing its frames (AES-256-GCM), as workers with `--cluster-secret-file` do.
    TcpSecret,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Local => "local",
            Transport::Tcp => "tcp",
            Transport::TcpSecret => "tcp-secret",
        }
    }
}

impl AlltoallArgs {
    fn validate(&self) -> Result<()> {
        if self.ranks < 2 {
            bail!("--ranks must be at least 2 (an exchange needs a peer)");
        }
        if self.tokens.is_empty() || self.tokens.contains(&0) {
            bail!("every --tokens value must be at least 1");
        }
        if self.hidden == 0 || self.iters == 0 {
            bail!("--hidden and --iters must be at least 1");
        }
        if self.experts < self.ranks {
            bail!(
                "--experts {} is fewer than --ranks {}",
                self.experts,
                self.ranks
            );
        }
        if self.topk == 0 || self.topk > self.experts {
            bail!("--topk must be in 1..=--experts ({})", self.experts);
        }
        Ok(())
    }
}

/// Each rank's dispatch messages: `send[rank][dest]`.
type Messages = Vec<Vec<Vec<u8>>>;

/// Bytes of the dispatch header before the rows: the count and one slot id per row.
fn header_len(count: usize) -> usize {
    4 + 4 * count
}

pub fn run(args: AlltoallArgs) -> Result<()> {
    args.validate()?;
    let placement = Placement::even(args.experts, args.ranks)
        .map_err(|e| anyhow!("cannot place the experts: {e}"))?;
    // owner[e] = (rank, slot) of logical expert e.
    let mut owner = vec![(0, 0); args.experts];
    for (rank, slots) in placement.layer(0).iter().enumerate() {
        for (slot, &e) in slots.iter().enumerate() {
            owner[e] = (rank, slot);
        }
    }
    let mut rows = Vec::new();
    for &tokens in &args.tokens {
        let send = route(&args, &owner, tokens);
        let comm = time_comm(&args, &send)?;
        let raw = time_raw(&args, &send)?;
        let rtt = time_rtt(&args, send[0][1].len())?;
        rows.push(row(&args, tokens, &send, &comm, &raw, &rtt));
    }
    let report = json!({
        "ranks": args.ranks,
        "transport": args.transport.name(),
        "hidden": args.hidden,
        "topk": args.topk,
        "experts": args.experts,
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": args.seed,
        "results": rows,
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Builds every rank's dispatch messages for `tokens` tokens per rank.
fn route(args: &AlltoallArgs, owner: &[(usize, usize)], tokens: usize) -> Messages {
    (0..args.ranks)
        .map(|rank| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                args.seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tokens as u64,
            );
            let mut slots: Vec<Vec<u32>> = vec![Vec::new(); args.ranks];
            let mut copies: Vec<Vec<usize>> = vec![Vec::new(); args.ranks];
            for token in 0..tokens {
                for e in rand::seq::index::sample(&mut rng, args.experts, args.topk) {
                    let (dest, slot) = owner[e];
                    slots[dest].push(slot as u32);
                    copies[dest].push(token);
                }
            }
            let row: Vec<u8> = (0..args.hidden)
                .flat_map(|_| rng.random::<f32>().to_le_bytes())
                .collect();
            slots
                .iter()
                .zip(&copies)
                .map(|(slots, copies)| {
                    let mut buf =
                        Vec::with_capacity(header_len(slots.len()) + row.len() * copies.len());
                    buf.extend_from_slice(&(slots.len() as u32).to_le_bytes());
                    for s in slots {
                        buf.extend_from_slice(&s.to_le_bytes());
                    }
                    for _ in copies {
                        buf.extend_from_slice(&row);
                    }
                    buf
                })
                .collect()
        })
        .collect()
}

/// Per timed iteration and rank: entry and exit of the dispatch and of the combine call.
type Stamps = Vec<[Instant; 4]>;

/// Per-exchange latencies in seconds (first entry to last exit over the ranks).
struct CommTimes {
    dispatch: Vec<f64>,
    combine: Vec<f64>,
    /// Bytes each rank sent to other ranks in the combine, by rank.
    combine_bytes: Vec<usize>,
    /// Seconds the group took to form (for TCP: the mesh, with its handshakes).
    formed: f64,
}

fn time_comm(args: &AlltoallArgs, send: &Messages) -> Result<CommTimes> {
    let forming = Instant::now();
    let comms: Vec<Box<dyn Communicator>> = match args.transport {
        Transport::Local => local_group(args.ranks)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect(),
        Transport::Tcp | Transport::TcpSecret => {
            let secret = (args.transport == Transport::TcpSecret)
                .then(|| {
                    let mut bytes = [0u8; 32];
                    rand::fill(&mut bytes);
                    ClusterSecret::new(&bytes)
                })
                .transpose()?;
            tcp_group_localhost_with(args.ranks, secret)?
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Communicator>)
                .collect()
        }
    };
    let formed = forming.elapsed().as_secs_f64();
    let barrier = Barrier::new(args.ranks);
    let per_rank: Vec<Result<(Stamps, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let barrier = &barrier;
                s.spawn(move || rank_loop(args, comm, send, barrier))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a rank thread panicked")))
            })
            .collect()
    });
    let mut stamps = Vec::new();
    let mut combine_bytes = Vec::new();
    for r in per_rank {
        let (s, b) = r?;
        stamps.push(s);
        combine_bytes.push(b);
    }
    let span = |enter: usize, exit: usize| -> Vec<f64> {
        (0..args.iters)
            .map(|i| {
                let first = stamps.iter().map(|s| s[i][enter]).min();
                let last = stamps.iter().map(|s| s[i][exit]).max();
                match (first, last) {
                    (Some(a), Some(b)) => (b - a).as_secs_f64(),
                    _ => 0.0,
                }
            })
            .collect()
    };
    Ok(CommTimes {
        dispatch: span(0, 1),
        combine: span(2, 3),
        combine_bytes,
        formed,
    })
}

/// One rank: warm-up and timed dispatch/combine pairs; returns its timestamps and the bytes it
/// sent to other ranks in one combine.
fn rank_loop(
    args: &AlltoallArgs,
    mut comm: Box<dyn Communicator>,
    send: &Messages,
    barrier: &Barrier,
) -> Result<(Stamps, usize)> {
    let me = comm.rank();
    let mut stamps = Vec::with_capacity(args.iters);
    let mut combine_bytes = 0;
    for iter in 0..args.warmup + args.iters {
        let out = send[me].clone();
        barrier.wait();
        let t0 = Instant::now();
        let recv = comm.all_to_all_v(out)?;
        let t1 = Instant::now();
        // The experts' outputs go back: as many rows as arrived, without the header.
        let mut back = Vec::with_capacity(recv.len());
        for (src, msg) in recv.iter().enumerate() {
            if msg.len() != send[src][me].len() {
                bail!(
                    "rank {me}: got {} bytes from rank {src}, which sent {}",
                    msg.len(),
                    send[src][me].len()
                );
            }
            let count = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
            back.push(msg[header_len(count)..].to_vec());
        }
        combine_bytes = back
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != me)
            .map(|(_, b)| b.len())
            .sum();
        barrier.wait();
        let t2 = Instant::now();
        let returned = comm.all_to_all_v(back)?;
        let t3 = Instant::now();
        for (dest, msg) in returned.iter().enumerate() {
            let sent = &send[me][dest];
            let count = u32::from_le_bytes([sent[0], sent[1], sent[2], sent[3]]) as usize;
            if msg.len() + header_len(count) != sent.len() {
                bail!(
                    "rank {me}: rank {dest} returned {} bytes of rows, expected {}",
                    msg.len(),
                    sent.len() - header_len(count)
                );
            }
        }
        if iter >= args.warmup {
            stamps.push([t0, t1, t2, t3]);
        }
    }
    Ok((stamps, combine_bytes))
}

/// A plain TCP connection for one ordered pair of ranks: `tx` is the sender's end, `rx` the
/// receiver's.
struct Link {
    from: usize,
    to: usize,
    tx: TcpStream,
    rx: TcpStream,
}

fn connect_links(ranks: usize) -> Result<Vec<Link>> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("cannot bind a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut links = Vec::new();
    for from in 0..ranks {
        for to in (0..ranks).filter(|&t| t != from) {
            let tx = TcpStream::connect(addr).context("cannot connect over loopback")?;
            let (rx, _) = listener.accept().context("cannot accept over loopback")?;
            // The same socket options as the communicator's mesh.
            tx.set_nodelay(true)?;
            rx.set_nodelay(true)?;
            links.push(Link { from, to, tx, rx });
        }
    }
    Ok(links)
}

/// The raw baseline: per iteration, every link carries `send[from][to].len()` bytes at once;
/// returns per-exchange latencies (first write start to last read end), in seconds.
fn time_raw(args: &AlltoallArgs, send: &Messages) -> Result<Vec<f64>> {
    let mut links = connect_links(args.ranks)?;
    let barrier = Barrier::new(2 * links.len());
    type Ends = Vec<std::io::Result<Vec<Instant>>>;
    let (starts, ends): (Ends, Ends) = std::thread::scope(|s| {
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for link in &mut links {
            let len = send[link.from][link.to].len();
            let barrier = &barrier;
            let (tx, rx) = (&mut link.tx, &mut link.rx);
            writers.push(s.spawn(move || {
                let data = vec![0x5Au8; len];
                let mut stamps = Vec::with_capacity(args.iters);
                for iter in 0..args.warmup + args.iters {
                    barrier.wait();
                    let t = Instant::now();
                    tx.write_all(&data)?;
                    if iter >= args.warmup {
                        stamps.push(t);
                    }
                }
                Ok(stamps)
            }));
            readers.push(s.spawn(move || {
                let mut data = vec![0u8; len];
                let mut stamps = Vec::with_capacity(args.iters);
                for iter in 0..args.warmup + args.iters {
                    barrier.wait();
                    rx.read_exact(&mut data)?;
                    if iter >= args.warmup {
                        stamps.push(Instant::now());
                    }
                }
                Ok(stamps)
            }));
        }
        let join = |hs: Vec<std::thread::ScopedJoinHandle<'_, std::io::Result<Vec<Instant>>>>| {
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("raw thread panicked")))
                })
                .collect::<Vec<_>>()
        };
        (join(writers), join(readers))
    });
    let starts = starts
        .into_iter()
        .collect::<std::io::Result<Vec<_>>>()
        .context("raw baseline write")?;
    let ends = ends
        .into_iter()
        .collect::<std::io::Result<Vec<_>>>()
        .context("raw baseline read")?;
    Ok((0..args.iters)
        .map(|i| {
            let first = starts.iter().map(|s| s[i]).min();
            let last = ends.iter().map(|s| s[i]).max();
            match (first, last) {
                (Some(a), Some(b)) => (b - a).as_secs_f64(),
                _ => 0.0,
            }
        })
        .collect())
}

/// The raw round trip of `len` bytes between rank 0 and rank 1: rank 0 writes, rank 1 reads all
/// and writes the same number back, rank 0 reads all; in seconds, per iteration.
fn time_rtt(args: &AlltoallArgs, len: usize) -> Result<Vec<f64>> {
    let mut links = connect_links(2)?;
    let (there, back) = links.split_at_mut(1);
    let (there, back) = (&mut there[0], &mut back[0]);
    let total = args.warmup + args.iters;
    std::thread::scope(|s| {
        let echo = s.spawn(|| -> std::io::Result<()> {
            let mut data = vec![0u8; len];
            for _ in 0..total {
                there.rx.read_exact(&mut data)?;
                back.tx.write_all(&data)?;
            }
            Ok(())
        });
        let mut data = vec![0xA5u8; len];
        let mut times = Vec::with_capacity(args.iters);
        for iter in 0..total {
            let t = Instant::now();
            there.tx.write_all(&data)?;
            back.rx.read_exact(&mut data)?;
            if iter >= args.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        echo.join()
            .map_err(|_| anyhow!("the echo thread panicked"))?
            .context("raw round trip")?;
        Ok(times)
    })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn row(
    args: &AlltoallArgs,
    tokens: usize,
    send: &Messages,
    comm: &CommTimes,
    raw: &[f64],
    rtt: &[f64],
) -> Value {
    let n = args.ranks;
    let to_peers =
        |r: usize| -> usize { (0..n).filter(|&d| d != r).map(|d| send[r][d].len()).sum() };
    let dispatch_bytes = (0..n).map(to_peers).sum::<usize>() as f64 / n as f64;
    let combine_bytes = comm.combine_bytes.iter().sum::<usize>() as f64 / n as f64;
    let per_peer = dispatch_bytes / (n - 1) as f64;
    let gbs = |bytes: f64, lat: &[f64]| {
        let m = mean(lat);
        if m > 0.0 {
            bytes / m / 1e9
        } else {
            0.0
        }
    };
    let us = |v: &[f64]| Dist::of(v).scaled(1e6);
    let (dispatch, combine, raw_lat, rtt_lat) =
        (us(&comm.dispatch), us(&comm.combine), us(raw), us(rtt));
    let dispatch_gbs = gbs(dispatch_bytes, &comm.dispatch);
    let combine_gbs = gbs(combine_bytes, &comm.combine);
    let raw_gbs = gbs(dispatch_bytes, raw);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    json!({
        "tokens": tokens,
        "token_copies_per_rank": tokens * args.topk,
        "dispatch_bytes_per_rank": dispatch_bytes,
        "combine_bytes_per_rank": combine_bytes,
        "dispatch_bytes_per_peer": per_peer,
        "dispatch_latency_us": dispatch.json(),
        "combine_latency_us": combine.json(),
        "dispatch_gb_s": dispatch_gbs,
        "combine_gb_s": combine_gbs,
        "raw_latency_us": raw_lat.json(),
        "raw_gb_s": raw_gbs,
        "raw_rtt_us": rtt_lat.json(),
        "dispatch_share_of_raw": ratio(dispatch_gbs, raw_gbs),
        "combine_share_of_raw": ratio(combine_gbs, raw_gbs),
        "dispatch_p50_over_raw_rtt_p50": ratio(dispatch.p50, rtt_lat.p50),
        "combine_p50_over_raw_rtt_p50": ratio(combine.p50, rtt_lat.p50),
        "group_formed_ms": comm.formed * 1e3,
    })
}

fn print_table(r: &Value) {
    println!(
        "all-to-all: {} ranks over {}, hidden {}, top-{} of {} experts, {} iterations after {} warm-up",
        r["ranks"], r["transport"].as_str().unwrap_or(""), r["hidden"], r["topk"], r["experts"], r["iters"], r["warmup"]
    );
    println!("GB/s = bytes a rank sends to other ranks per exchange / mean exchange latency; raw = plain TCP, same bytes and pairs");
    println!(
        "{:>6} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9} {:>10} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "tokens",
        "MB/peer",
        "disp p50us",
        "disp GB/s",
        "comb p50us",
        "comb GB/s",
        "raw GB/s",
        "rtt p50us",
        "disp/raw",
        "comb/raw",
        "disp/rtt",
        "comb/rtt",
        "formed ms"
    );
    for row in r["results"].as_array().into_iter().flatten() {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let p50 = |k: &str| row[k]["p50"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>6} {:>11.3} {:>10.1} {:>9.3} {:>10.1} {:>9.3} {:>9.3} {:>10.1} {:>7.2} {:>7.2} {:>9.2} {:>9.2} {:>9.2}",
            row["tokens"],
            f("dispatch_bytes_per_peer") / 1e6,
            p50("dispatch_latency_us"),
            f("dispatch_gb_s"),
            p50("combine_latency_us"),
            f("combine_gb_s"),
            f("raw_gb_s"),
            p50("raw_rtt_us"),
            f("dispatch_share_of_raw"),
            f("combine_share_of_raw"),
            f("dispatch_p50_over_raw_rtt_p50"),
            f("combine_p50_over_raw_rtt_p50"),
            f("group_formed_ms"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_sends_topk_copies_per_token_to_the_owners() {
        let args = AlltoallArgs {
            ranks: 2,
            transport: Transport::Local,
            tokens: vec![5],
            hidden: 3,
            topk: 4,
            experts: 8,
            iters: 1,
            warmup: 0,
            seed: 1,
            json: true,
        };
        let placement = Placement::even(8, 2).expect("placement");
        let mut owner = vec![(0, 0); 8];
        for (rank, slots) in placement.layer(0).iter().enumerate() {
            for (slot, &e) in slots.iter().enumerate() {
                owner[e] = (rank, slot);
            }
        }
        let send = route(&args, &owner, 5);
        for msgs in &send {
            let copies: usize = msgs
                .iter()
                .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize)
                .sum();
            assert_eq!(copies, 5 * 4);
            for m in msgs {
                let count = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
                assert_eq!(m.len(), header_len(count) + count * 3 * 4);
            }
        }
        assert_eq!(send, route(&args, &owner, 5), "seeded");
    }
}
