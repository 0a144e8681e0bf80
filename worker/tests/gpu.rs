//! The CUDA backend against the fixtures' transformers goldens. It runs where the worker is
//! built with `--features cuda` and a GPU answers (`bash scripts/gpu_check.sh`), and says why
//! it skipped everywhere else. `scripts/test.sh` also runs it on the CPU's stand-in for CUDA
//! (`tests/cuda_host/shim.cpp`), which checks what the backend asks of the driver and cuBLAS,
//! not a GPU.

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backend_follows_transformers() {
    eprintln!("skipped: built without the cuda feature (cargo test --features cuda)");
}

#[cfg(feature = "cuda")]
mod golden;

/// bf16 weights multiply bf16-rounded activations on the GPU, as PyTorch's bf16 path does, so
/// the f32 bar (1e-3) does not apply. The bars are those of the CPU's bf16 activations
/// (`parity.rs`): every continuation's first token equal to the golden one with its logprob
/// within 0.03, and later logprobs within 0.25 until a continuation first departs. The f32 and
/// f16 fixtures' weights are f32 on the GPU and keep the 1e-3 bar.
#[cfg(feature = "cuda")]
#[test]
fn cuda_backend_follows_transformers() {
    let Some(backend) = gpu::open() else { return };
    eprintln!("running on cuda:0, {}", backend.device_name());
    let backend = std::sync::Arc::new(backend);
    // Every fixture: bf16 weights (demo, tiny-v3), FP8 ones (tiny-v3-fp8), f32 ones with YaRN
    // (tiny-v2, tiny-v3-yarn) and f16 ones, which load as f32 (tiny-v2-lite).
    for name in [
        "demo",
        "tiny-v3",
        "tiny-v3-fp8",
        "tiny-v2",
        "tiny-v3-yarn",
        "tiny-v2-lite",
    ] {
        let bf16 = ["demo", "tiny-v3", "tiny-v3-fp8"].contains(&name);
        let (first_bar, later_bar) = if bf16 { (0.03, 0.25) } else { (1e-3, 1e-3) };
        let golden = golden::golden(name);
        let model = gpu::model(&golden::fixture(name), backend.clone());
        let (mut worst_first, mut worst) = (0.0f32, 0.0f32);
        for case in &golden.cases {
            let (tokens, logprobs) =
                gpu::greedy(&model, &case.prompt_ids, case.new_token_ids.len());
            assert_eq!(
                tokens[0], case.new_token_ids[0],
                "{name}/{}: first token differs",
                case.name
            );
            let same = tokens
                .iter()
                .zip(&case.new_token_ids)
                .take_while(|(a, b)| a == b)
                .count();
            let first = (logprobs[0] - case.logprobs[0]).abs();
            let later = golden::max_diff(&logprobs[..same], &case.logprobs[..same]);
            assert!(
                first < first_bar,
                "{name}/{}: first logprob differs by {first}",
                case.name
            );
            assert!(
                later < later_bar,
                "{name}/{}: logprobs differ by {later}",
                case.name
            );
            worst_first = worst_first.max(first);
            worst = worst.max(later);
        }
        eprintln!("{name} on the GPU: worst logprob difference {worst_first:.2e} at the first token, {worst:.2e} before any departure");
    }
}

/// Runs where NVRTC is installed, GPU or not: the kernels of `nvrtc.cu` compile and export
/// their entry points. `scripts/test.sh` puts NVIDIA's PyPI wheel of NVRTC on the library path
/// and sets `MOEBIUS_REQUIRE_NVRTC`, under which a missing NVRTC fails the test instead of
/// skipping. (On the CPU's stand-in, whose NVRTC compiles nothing, `scripts/test.sh` skips it.)
#[cfg(feature = "cuda")]
#[test]
fn kernels_compile_with_nvrtc() {
    use moebius_worker::backend::nvrtc;
    use moebius_worker::Error;

    let ptx = match nvrtc::ptx() {
        Ok(ptx) => ptx.to_src(),
        Err(Error::Device(why))
            if why.contains("not on the library path")
                && std::env::var_os("MOEBIUS_REQUIRE_NVRTC").is_none() =>
        {
            eprintln!("skipped: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let source = include_str!("../src/backend/nvrtc.cu");
    if ptx.trim_end_matches('\0') == source {
        // What `gpu_check.sh` meets when tried on the stand-in, which it does not count as a
        // GPU test that skipped.
        eprintln!("not checked on the CPU's stand-in, whose NVRTC gives back the source");
        return;
    }
    // Every kernel the source declares.
    let entries: Vec<&str> = source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .collect();
    assert!(entries.len() >= 8, "kernels found: {entries:?}");
    for entry in entries {
        assert!(
            ptx.contains(&format!(".entry {entry}(")),
            "no entry point {entry} in the PTX"
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::path::Path;
    use std::sync::Arc;

    use moebius_coordinator::Placement;
    use moebius_worker::backend::cuda::CudaBackend;
    use moebius_worker::backend::{RowLogits, Wants};
    use moebius_worker::checkpoint::Checkpoint;
    use moebius_worker::comm::local_group;
    use moebius_worker::config::ModelConfig;
    use moebius_worker::model::{Model, SharedWeights, StepInput};

    /// `n` values drawn uniformly from [-1, 1).
    pub fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        use rand::Rng;
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// A `[rows, cols]` weight of `values` rounded to bf16: bf16 on the GPU, and the same
    /// values widened to f32 on the CPU.
    pub fn bf16_pair(
        gpu: &CudaBackend,
        cpu: &moebius_worker::backend::CpuBackend,
        (rows, cols): (usize, usize),
        values: &[f32],
    ) -> (
        moebius_worker::backend::cuda::CudaMatrix,
        moebius_worker::backend::cpu::CpuMatrix,
    ) {
        use moebius_worker::backend::Backend;
        let bits: Vec<u16> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let wide = bits
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        (
            gpu.matrix_bf16(rows, cols, bits),
            cpu.matrix(rows, cols, wide),
        )
    }

    /// GPU 0, or `None` after saying why the test skips. With `MOEBIUS_REQUIRE_GPU` set (the
    /// run on `cuda_host`'s stand-in, and `gpu_check.sh`), no GPU fails the test instead.
    pub fn open() -> Option<CudaBackend> {
        match CudaBackend::open(0, 1) {
            Ok(backend) => Some(backend),
            Err(e) if std::env::var_os("MOEBIUS_REQUIRE_GPU").is_some() => {
                panic!("MOEBIUS_REQUIRE_GPU is set, but there is no GPU: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no GPU to run on ({e})");
                None
            }
        }
    }

    /// The model of `dir` as one rank holding every expert, on `backend`.
    pub fn model(dir: &Path, backend: Arc<CudaBackend>) -> Model<CudaBackend> {
        let config = ModelConfig::from_dir(dir).expect("fixture config");
        let mut checkpoint = Checkpoint::open(dir).expect("fixture checkpoint");
        if let Some([r, c]) = config.fp8_block {
            checkpoint.set_fp8_block(r, c);
        }
        let shared = SharedWeights::load(&checkpoint, &config, backend).expect("weights load");
        let placement = Placement::even(config.n_routed_experts.max(1), 1).expect("placement");
        Model::new(Arc::new(shared), &checkpoint, &placement, 0).expect("rank model")
    }

    /// Greedy continuation of `prompt` by `steps` tokens, with each token's logprob.
    pub fn greedy(
        model: &Model<CudaBackend>,
        prompt: &[u32],
        steps: usize,
    ) -> (Vec<u32>, Vec<f32>) {
        let mut comm = local_group(1).pop().expect("one end");
        let mut cache = model.new_cache();
        let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
        let mut next: Vec<u32> = prompt.to_vec();
        for _ in 0..steps {
            let step = model.forward(
                &mut [StepInput {
                    tokens: &next,
                    cache: &mut cache,
                    wants: Wants::All,
                }],
                &mut comm,
            );
            let Ok([RowLogits::All(logits)]) = step.as_deref() else {
                panic!("a step gives every logit it was asked for: {step:?}");
            };
            let (best, _) =
                logits
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                        if v > bv {
                            (i, v)
                        } else {
                            (bi, bv)
                        }
                    });
            let top = logits[best];
            let sum: f64 = logits.iter().map(|&v| f64::from(v - top).exp()).sum();
            tokens.push(best as u32);
            logprobs.push(-(sum.ln() as f32));
            next = vec![best as u32];
        }
        (tokens, logprobs)
    }
}

/// The backend's grouped products and MLPs on the GPU against the CPU backend on the same
/// weights widened to f32: f32, bf16 and FP8 weights mixed in one group, with row counts on
/// both sides of the FP8 kernel's limit (`FP8_GEMV_ROWS`), and groups of experts at decode as
/// the backend launches them together. bf16 and large FP8 products round their activations to
/// bf16, hence the bar of 2% of the largest output.
#[cfg(feature = "cuda")]
#[test]
fn cuda_groups_match_the_cpu() {
    use moebius_worker::backend::{Backend, CpuBackend, MlpRun, Product};
    use rand::{Rng, SeedableRng};

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (hidden, width) = (256, 128);
    let weight =
        |rng: &mut rand_chacha::ChaCha8Rng, dtype: usize, rows: usize, cols: usize| match dtype {
            0 => {
                let w: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-0.1..0.1))
                    .collect();
                (gpu.matrix(rows, cols, w.clone()), cpu.matrix(rows, cols, w))
            }
            1 => {
                let w: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-0.1..0.1))
                    .collect();
                gpu::bf16_pair(&gpu, &cpu, (rows, cols), &w)
            }
            _ => {
                let blocks = moebius_worker::checkpoint::Fp8Blocks {
                    rows,
                    cols,
                    codes: (0..rows * cols)
                        .map(|_| loop {
                            let c: u8 = rng.random();
                            if c & 0x7f != 0x7f {
                                break c;
                            }
                        })
                        .collect(),
                    scales: (0..rows.div_ceil(128) * cols.div_ceil(128))
                        .map(|_| rng.random_range(1e-4..1e-3))
                        .collect(),
                    block: (128, 128),
                };
                let wide = blocks.dequantize();
                (gpu.matrix_fp8(blocks), cpu.matrix(rows, cols, wide))
            }
        };
    let close = |what: &str, got: &[f32], want: &[f32]| {
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst <= 0.02 * scale + 1e-5,
            "{what}: off by {worst} at a scale of {scale}"
        );
        eprintln!("{what}: worst difference {worst:.2e} at a scale of {scale:.2e}");
    };
    // f32, bf16 and FP8 weights mixed; then a MoE layer's experts at decode, all FP8 of a few
    // rows (one `fp8_gemv_grouped` launch per phase, one `silu_mul` for all, an expert that
    // received no rows among them); then f32 and bf16 experts that took a row each (a batched
    // cuBLAS call per dtype and phase) beside one that took two.
    // Which dtype (0 f32, 1 bf16, 2 FP8) run i's gate_up and down have.
    type Dtypes = fn(usize) -> (usize, usize);
    let mixed: Dtypes = |i| (i % 3, (i + 1) % 3);
    let experts: Dtypes = |_| (2, 2);
    let alternating: Dtypes = |i| (i % 2, i % 2);
    let cases = [
        ("mixed", vec![1, 3, 8, 9, 40], mixed),
        ("fp8 experts", vec![1, 2, 0, 8, 5], experts),
        (
            "f32 and bf16 experts of a row",
            vec![1, 1, 1, 1, 2, 1],
            alternating,
        ),
    ];
    for (case, rows, dtypes) in cases {
        let mlps: Vec<_> = (0..rows.len())
            .map(|i| {
                let (gate_up, down) = dtypes(i);
                (
                    weight(&mut rng, gate_up, 2 * width, hidden),
                    weight(&mut rng, down, hidden, width),
                )
            })
            .collect();
        let xs: Vec<Vec<f32>> = rows
            .iter()
            .map(|&m| {
                (0..m * hidden)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect()
            })
            .collect();

        // linear_grouped: each MLP's gate_up, one group.
        let mut on_gpu: Vec<Vec<f32>> = rows.iter().map(|&m| vec![0.0; m * 2 * width]).collect();
        let mut on_cpu = on_gpu.clone();
        let mut group: Vec<Product<'_, _>> = xs
            .iter()
            .zip(&rows)
            .zip(&mlps)
            .zip(&mut on_gpu)
            .map(|(((x, &m), ((w, _), _)), out)| Product { x, m, w, out })
            .collect();
        let before = gpu.transfers();
        gpu.linear_grouped(&mut group);
        assert_eq!(
            gpu.transfers().waits - before.waits,
            1,
            "a group of products is one round trip"
        );
        let mut group: Vec<Product<'_, _>> = xs
            .iter()
            .zip(&rows)
            .zip(&mlps)
            .zip(&mut on_cpu)
            .map(|(((x, &m), ((_, w), _)), out)| Product { x, m, w, out })
            .collect();
        cpu.linear_grouped(&mut group);
        for (i, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            close(
                &format!("{case}: linear_grouped, product {i} ({} rows)", rows[i]),
                g,
                c,
            );
        }

        // mlp_grouped: the whole MLPs, one group.
        let mut on_gpu: Vec<Vec<f32>> = rows.iter().map(|&m| vec![0.0; m * hidden]).collect();
        let mut on_cpu = on_gpu.clone();
        let mut runs: Vec<MlpRun<'_, _>> = xs
            .iter()
            .zip(&rows)
            .zip(&mlps)
            .zip(&mut on_gpu)
            .map(|(((x, &m), ((gate_up, _), (down, _))), out)| MlpRun {
                x,
                m,
                gate_up,
                down,
                out,
            })
            .collect();
        let before = gpu.transfers();
        gpu.mlp_grouped(&mut runs);
        assert_eq!(
            gpu.transfers().waits - before.waits,
            1,
            "a group of MLPs is one round trip"
        );
        let mut runs: Vec<MlpRun<'_, _>> = xs
            .iter()
            .zip(&rows)
            .zip(&mlps)
            .zip(&mut on_cpu)
            .map(|(((x, &m), ((_, gate_up), (_, down))), out)| MlpRun {
                x,
                m,
                gate_up,
                down,
                out,
            })
            .collect();
        cpu.mlp_grouped(&mut runs);
        for (i, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
            close(
                &format!("{case}: mlp_grouped, run {i} ({} rows)", rows[i]),
                g,
                c,
            );
        }
    }
}

/// The `nccl` data plane between GPUs of this machine, one rank per GPU over a `tcp` mesh on
/// localhost: every rank gets exactly what each sent it, from empty messages to 4 MiB, and a
/// rank that leaves is blamed by the others. NCCL does not put two ranks of one communicator
/// on one GPU, so on a machine with one GPU only a group of one is formed and the test says so.
#[cfg(feature = "cuda")]
#[test]
fn nccl_exchanges_exactly_what_was_sent() {
    use moebius_worker::comm::nccl::NcclComm;
    use moebius_worker::comm::{tcp_group_localhost, Communicator};
    use std::time::Duration;

    // SAFETY: only tries to load the library by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return eprintln!(
            "skipped: no GPU to run on (no CUDA driver: libcuda.so is not on the library path)"
        );
    }
    let gpus = match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => n as usize,
        Ok(_) => return eprintln!("skipped: no GPU to run on"),
        Err(e) => return eprintln!("skipped: no GPU to run on ({e})"),
    };
    // SAFETY: only tries to load the library by name.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        // Not "skipped:" at the start of the line: gpu_check.sh takes that for a missing GPU.
        return eprintln!("nccl: skipped, NCCL (libnccl.so.2) is not on the library path");
    }
    let world = gpus.min(4);
    let payload = |from: usize, to: usize, round: usize| -> Vec<u8> {
        const SIZES: [usize; 5] = [0, 1, 4097, 65_537, (4 << 20) + 3];
        let len = SIZES[(from * 3 + to * 2 + round) % SIZES.len()];
        (0..len)
            .map(|i| {
                (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add((from * 64 + to * 8 + round) as u32) as u8
            })
            .collect()
    };
    let meshes = tcp_group_localhost(world).expect("a tcp mesh on localhost");
    // The survivors stay until all have seen the leaver go, so that none blames another.
    let survivors = std::sync::Barrier::new(world.saturating_sub(1).max(1));
    let survivors = &survivors;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = meshes
            .into_iter()
            .map(|mesh| {
                s.spawn(move || {
                    let me = mesh.rank();
                    let mut comm = NcclComm::form(
                        mesh,
                        me,
                        Duration::from_secs(60),
                        Some(Duration::from_secs(20)),
                    )
                    .expect("the NCCL communicator forms");
                    assert_eq!(comm.backend(), "nccl");
                    for round in 0..5 {
                        let send = (0..world).map(|to| payload(me, to, round)).collect();
                        let recv = comm.all_to_all_v(send).expect("an exchange");
                        for (from, got) in recv.iter().enumerate() {
                            assert!(
                                *got == payload(from, me, round),
                                "rank {me} round {round}: wrong bytes from rank {from}"
                            );
                        }
                    }
                    if world > 1 && me == world - 1 {
                        drop(comm);
                        return None;
                    }
                    let error = comm.all_gather(vec![1]).err();
                    survivors.wait();
                    Some(error)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    });
    if world == 1 {
        eprintln!(
            "nccl: a group of one formed and exchanged; NCCL between ranks needs two GPUs and \
             this machine has one, so that part did not run"
        );
        return;
    }
    for (rank, result) in results.into_iter().enumerate().take(world - 1) {
        let error = result
            .flatten()
            .expect("the gather after a rank left fails");
        assert!(
            matches!(&error, moebius_worker::Error::PeerFailed { peers, .. } if peers == &[world - 1]),
            "rank {rank}: {error}"
        );
    }
    eprintln!("nccl: {world} ranks on {world} GPUs exchanged 5 rounds exactly");
}

/// The cache of latents on the GPU and absorbed attention over it, against the CPU backend's:
/// rows appended in several steps (into pages of the GPU's pool, without waiting for it), a
/// failed step taken back, then a prefill-sized block of queries and a decode row over it, each
/// one round trip.
#[cfg(feature = "cuda")]
#[test]
fn cuda_attention_over_cached_rows_matches_the_cpu() {
    use moebius_worker::backend::{grid, Attend, Backend, CpuBackend};
    use rand::SeedableRng;

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let (heads, lora, rope) = (16, 512, 64);
    let width = lora + rope;
    let mut values = |n: usize| gpu::random(&mut rng, n);
    let (mut on_gpu, mut on_cpu) = (gpu.new_rows(width), cpu.new_rows(width));
    // Appends within one page (one copy) and across pages (`paged_rows`), none of which waits
    // for the GPU.
    let before = gpu.transfers();
    for step in [1usize, 7, 40, 3, 200] {
        let rows = values(step * width);
        gpu.append_rows(&mut on_gpu, &rows);
        cpu.append_rows(&mut on_cpu, &rows);
    }
    let appended = gpu.transfers();
    assert_eq!(appended.waits, before.waits, "appending rows waited");
    assert_eq!(appended.uploaded - before.uploaded, 251 * width as u64 * 4);
    // A step that failed: its rows come back off, and the pages past them go back to the pool.
    let failed = values(30 * width);
    gpu.append_rows(&mut on_gpu, &failed);
    gpu.truncate_rows(&mut on_gpu, 251);
    assert_eq!(
        gpu.rows_bytes(&on_gpu),
        251usize.div_ceil(grid::PAGE_ROWS) * grid::PAGE_ROWS * width * 4,
        "the cache holds the pages of its rows, no more"
    );
    let cached = gpu.read_rows(&on_gpu, 251);
    assert!(
        cached[..] == cpu.read_rows(&on_cpu, 251)[..],
        "the cached rows differ"
    );

    for (position, queries) in [(150usize, 101usize), (250, 1)] {
        let q = values(queries * heads * width);
        let (mut got, mut want) = (
            vec![f32::NAN; queries * heads * lora],
            vec![f32::NAN; queries * heads * lora],
        );
        let scale = 1.0 / (192f32).sqrt();
        let before = gpu.transfers();
        gpu.attend_rows(&q, queries, heads, &on_gpu, position, lora, scale, &mut got);
        assert_eq!(
            gpu.transfers().waits - before.waits,
            1,
            "attention is one round trip"
        );
        cpu.attend_rows(
            &q, queries, heads, &on_cpu, position, lora, scale, &mut want,
        );
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst < 1e-4,
            "{queries} queries at {position}: off by {worst}"
        );
        eprintln!(
            "attention on the GPU, {queries} queries at {position}: worst difference {worst:.2e}"
        );
    }

    // A step's sequences at once: a decode row over this cache, a short prefill over a new one
    // and a row over the first 11 rows of that one, in one round trip and, where cuBLAS groups
    // products of many shapes, in four launches whatever the number of sequences: the gather
    // of every cache, the scores, the softmax and the weighted sums.
    let (mut short_gpu, mut short_cpu) = (gpu.new_rows(width), cpu.new_rows(width));
    let rows = values(20 * width);
    gpu.append_rows(&mut short_gpu, &rows);
    cpu.append_rows(&mut short_cpu, &rows);
    let (q_long, q_short, q_early) = (
        values(heads * width),
        values(20 * heads * width),
        values(heads * width),
    );
    let scale = 0.1;
    let mut got = (
        vec![f32::NAN; heads * lora],
        vec![f32::NAN; 20 * heads * lora],
        vec![f32::NAN; heads * lora],
    );
    let mut want = got.clone();
    let before = gpu.transfers();
    gpu.attend_grouped(
        heads,
        lora,
        scale,
        &mut [
            Attend {
                q: &q_long,
                queries: 1,
                rows: &on_gpu,
                position: 250,
                out: &mut got.0,
            },
            Attend {
                q: &q_short,
                queries: 20,
                rows: &short_gpu,
                position: 0,
                out: &mut got.1,
            },
            Attend {
                q: &q_early,
                queries: 1,
                rows: &short_gpu,
                position: 10,
                out: &mut got.2,
            },
        ],
    );
    let after = gpu.transfers();
    assert_eq!(
        after.waits - before.waits,
        1,
        "a step's attention is one round trip"
    );
    let launches = if gpu.groups_products_of_many_shapes() {
        4
    } else {
        2 + 2 * 3 // the gather and the softmax; scores and sums per sequence
    };
    assert_eq!(after.launches - before.launches, launches);
    cpu.attend_rows(&q_long, 1, heads, &on_cpu, 250, lora, scale, &mut want.0);
    cpu.attend_rows(&q_short, 20, heads, &short_cpu, 0, lora, scale, &mut want.1);
    cpu.attend_rows(&q_early, 1, heads, &short_cpu, 10, lora, scale, &mut want.2);
    for (got, want) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
        let worst = got
            .iter()
            .zip(want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(worst < 1e-4, "grouped attention: off by {worst}");
    }
}

/// MLA's absorbed attention of a step from its queries on the GPU (`attend_absorbed`: the
/// per-head products, the absorbed queries put together, attention over each sequence's cache
/// and the per-head values, then also through o_proj) against the CPU backend's, in one round
/// trip. The weights are bf16, so the GPU rounds their activations to bf16: the bar is 2% of the
/// largest output.
#[cfg(feature = "cuda")]
#[test]
fn cuda_absorbed_attention_matches_the_cpu_in_one_round_trip() {
    use moebius_worker::backend::{Absorbed, AbsorbedRun, Backend, CpuBackend};
    use rand::SeedableRng;

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (heads, nope, rope, lora, v) = (4, 16, 8, 32, 16);
    let mut random = |n: usize| gpu::random(&mut rng, n);
    let mut bf16 = |rows: usize, cols: usize| {
        let w: Vec<f32> = random(rows * cols).iter().map(|x| x * 0.3).collect();
        gpu::bf16_pair(&gpu, &cpu, (rows, cols), &w)
    };
    let uk_t: Vec<_> = (0..heads).map(|_| bf16(lora, nope)).collect();
    let uv: Vec<_> = (0..heads).map(|_| bf16(v, lora)).collect();
    let o_proj = bf16(24, heads * v);
    let width = lora + rope;
    // Two sequences: a decode row after 39 cached positions, a prefill of 5 from the start.
    let (mut caches_gpu, mut caches_cpu) = (Vec::new(), Vec::new());
    for len in [40, 5] {
        let rows = random(len * width);
        let (mut g, mut c) = (gpu.new_rows(width), cpu.new_rows(width));
        gpu.append_rows(&mut g, &rows);
        cpu.append_rows(&mut c, &rows);
        caches_gpu.push(g);
        caches_cpu.push(c);
    }
    let n = 1 + 5;
    let q = random(n * heads * (nope + rope));
    // The same call for either backend: its weights (`.0` GPU, `.1` CPU) and its caches.
    macro_rules! attend {
        ($backend:expr, $side:tt, $caches:expr, $project:expr, $out:expr) => {
            $backend.attend_absorbed(
                &Absorbed {
                    uk_t: uk_t.iter().map(|w| &w.$side).collect(),
                    uv: uv.iter().map(|w| &w.$side).collect(),
                    o_proj: $project.then_some(&o_proj.$side),
                    nope,
                    rope,
                    lora,
                    v,
                    scale: 0.2,
                },
                &q,
                &[
                    AbsorbedRun {
                        queries: 1,
                        rows: &$caches[0],
                        position: 39,
                    },
                    AbsorbedRun {
                        queries: 5,
                        rows: &$caches[1],
                        position: 0,
                    },
                ],
                $out,
            )
        };
    }
    // The heads' values, then the same through o_proj.
    for (project, outputs) in [(false, heads * v), (true, 24)] {
        let (mut got, mut want) = (vec![f32::NAN; n * outputs], vec![f32::NAN; n * outputs]);
        let before = gpu.transfers();
        attend!(gpu, 0, caches_gpu, project, &mut got);
        assert_eq!(
            gpu.transfers().waits - before.waits,
            1,
            "absorbed attention is one round trip"
        );
        attend!(cpu, 1, caches_cpu, project, &mut want);
        let scale = want.iter().fold(0.0f32, |a, w| a.max(w.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst <= 0.02 * scale,
            "o_proj {project}: off by {worst} at a scale of {scale}"
        );
        eprintln!(
            "absorbed attention on the GPU (o_proj {project}): worst difference {worst:.2e} at \
             a scale of {scale:.2e}"
        );
    }
}

/// MLA's whole attention block on the GPU (the stacked input product, both norms, `q_b`, the
/// rotation of queries and keys in either pairing, the new cache rows appended from the GPU
/// within a page and across pages, absorbed attention and o_proj) against the CPU backend's,
/// in one round trip. The weights are bf16, so the GPU rounds their activations to bf16: the
/// bar is 2% of the largest value, for the outputs and for the cached rows.
#[cfg(feature = "cuda")]
#[test]
fn cuda_attention_block_matches_the_cpu_in_one_round_trip() {
    use moebius_worker::backend::{Absorbed, AttentionBlock, Backend, BlockRun, CpuBackend};
    use moebius_worker::backend::{Rotation, Router, ThenRoute};
    use moebius_worker::config::TopkMethod;
    use rand::{Rng, SeedableRng};

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let (hidden, heads, nope, rope, lora, v, q_lora) = (48, 4, 16, 8, 32, 16, 24);
    let (width, qk) = (lora + rope, nope + rope);
    let mut bf16 = |rows: usize, cols: usize| {
        let w: Vec<f32> = gpu::random(&mut rng, rows * cols)
            .iter()
            .map(|x| x * 0.3)
            .collect();
        gpu::bf16_pair(&gpu, &cpu, (rows, cols), &w)
    };
    let input = bf16(q_lora + width, hidden);
    let q_b = bf16(heads * qk, q_lora);
    let uk_t: Vec<_> = (0..heads).map(|_| bf16(lora, nope)).collect();
    let uv: Vec<_> = (0..heads).map(|_| bf16(v, lora)).collect();
    let o_proj = bf16(hidden, heads * v);
    let q_norm = gpu::random(&mut rng, q_lora);
    let kv_norm = gpu::random(&mut rng, lora);
    // A decode row after 39 cached positions (within a page) and a chunk of 20 after 10 (across
    // two pages).
    let sequences = [(39, 1), (10, 20)];
    let n: usize = sequences.iter().map(|s| s.1).sum();
    let x = gpu::random(&mut rng, n * hidden);
    let angles: Vec<f32> = (0..n * rope / 2)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let cached: Vec<Vec<f32>> = sequences
        .iter()
        .map(|&(len, _)| gpu::random(&mut rng, len * width))
        .collect();
    // Runs `$call` with the block and its runs on `$backend` (`$side` of each weight pair) over
    // fresh caches; returns what it returned and every cache read back.
    macro_rules! block {
        ($backend:expr, $side:tt, |$block:ident, $runs:ident| $call:expr) => {{
            let mut caches: Vec<_> = cached
                .iter()
                .map(|rows| {
                    let mut c = $backend.new_rows(width);
                    $backend.append_rows(&mut c, rows);
                    c
                })
                .collect();
            let block = AttentionBlock {
                input: &input.$side,
                q_norm: &q_norm,
                q_b: &q_b.$side,
                kv_norm: &kv_norm,
                eps: 1e-6,
                attention: Absorbed {
                    uk_t: uk_t.iter().map(|w| &w.$side).collect(),
                    uv: uv.iter().map(|w| &w.$side).collect(),
                    o_proj: Some(&o_proj.$side),
                    nope,
                    rope,
                    lora,
                    v,
                    scale: 0.2,
                },
            };
            let mut runs: Vec<_> = caches
                .iter_mut()
                .zip(&sequences)
                .map(|(rows, &(position, queries))| BlockRun {
                    queries,
                    rows,
                    position,
                })
                .collect();
            let result = {
                let ($block, $runs) = (&block, &mut runs[..]);
                $call
            };
            drop(runs);
            let rows = caches
                .iter()
                .zip(&sequences)
                .map(|(c, &(len, queries))| $backend.read_rows(c, len + queries).into_owned())
                .collect::<Vec<Vec<f32>>>();
            (result, rows)
        }};
    }
    let close = |what: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0.0f32, |a, w| a.max(w.abs()));
        let worst = (got.iter().zip(want)).fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst <= 0.02 * scale,
            "{what}: off by {worst} at a scale of {scale}"
        );
        worst / scale
    };
    let check_caches = |what: &str, gpu_rows: &[Vec<f32>], cpu_rows: &[Vec<f32>]| {
        for (i, (g, c)) in gpu_rows.iter().zip(cpu_rows).enumerate() {
            assert_eq!(
                g[..cached[i].len()],
                cached[i][..],
                "{what}: sequence {i}'s cached rows moved"
            );
            close(&format!("{what}: sequence {i}'s new rows"), g, c);
        }
    };
    // A MoE layer's post-attention norm and gate (noaux_tc: 16 experts in 4 groups, the best 2
    // groups kept, top 4), and the residual the block adds to.
    let post_norm = gpu::random(&mut rng, hidden);
    let gate_w: Vec<f32> = gpu::random(&mut rng, 16 * hidden);
    let gate = (
        gpu.matrix(16, hidden, gate_w.clone()),
        cpu.matrix(16, hidden, gate_w),
    );
    let correction = gpu::random(&mut rng, 16);
    let residual_in = gpu::random(&mut rng, n * hidden);
    let router = Router {
        weight: &gate.0,
        correction_bias: Some(&correction[..]),
        method: TopkMethod::NoauxTc,
        experts: 16,
        top_k: 4,
        n_group: 4,
        topk_group: 2,
        norm_topk_prob: true,
        scaling: 2.5,
    };
    for interleave in [false, true] {
        let rotation = Rotation {
            cos_sin: angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect(),
            interleave,
        };
        let what = format!("interleave {interleave}");
        let (mut got, mut want) = (vec![f32::NAN; n * hidden], vec![f32::NAN; n * hidden]);
        let before = gpu.transfers();
        let ((), caches_gpu) = block!(gpu, 0, |b, r| gpu
            .attention_block(b, &x, &rotation, r, &mut got));
        let ((), cpu_caches) = block!(cpu, 1, |b, r| cpu
            .attention_block(b, &x, &rotation, r, &mut want));
        let waits = gpu.transfers().waits - before.waits;
        // The caches' first uploads wait for nothing; reading them back waits once each.
        assert_eq!(
            waits,
            1 + sequences.len() as u64,
            "the block is one round trip"
        );
        let off = close(&format!("{what}: outputs"), &got, &want);
        check_caches(&what, &caches_gpu, &cpu_caches);
        eprintln!(
            "attention block on the GPU (interleave {interleave}): worst difference {off:.2e} of \
             the largest output"
        );

        // The same block with the residual, the post-attention norm and the gate's routing
        // after it, still in one round trip.
        let what = format!("{what}, routed");
        let then_gpu = ThenRoute {
            norm: &post_norm,
            eps: 1e-6,
            router: router.with_weight(&gate.0),
        };
        let then_cpu = ThenRoute {
            norm: &post_norm,
            eps: 1e-6,
            router: router.with_weight(&gate.1),
        };
        let (mut residual_gpu, mut residual_cpu) = (residual_in.clone(), residual_in.clone());
        let (mut normed_gpu, mut normed_cpu) =
            (vec![f32::NAN; n * hidden], vec![f32::NAN; n * hidden]);
        let before = gpu.transfers();
        let (routes, caches_gpu) = block!(gpu, 0, |b, r| gpu.attention_block_routed(
            b,
            &x,
            &rotation,
            r,
            &then_gpu,
            &mut residual_gpu,
            &mut normed_gpu
        ));
        let (_, cpu_caches) = block!(cpu, 1, |b, r| cpu.attention_block_routed(
            b,
            &x,
            &rotation,
            r,
            &then_cpu,
            &mut residual_cpu,
            &mut normed_cpu
        ));
        let waits = gpu.transfers().waits - before.waits;
        assert_eq!(waits, 1 + sequences.len() as u64, "{what}: one round trip");
        close(&format!("{what}: residual"), &residual_gpu, &residual_cpu);
        close(
            &format!("{what}: normalised rows"),
            &normed_gpu,
            &normed_cpu,
        );
        check_caches(&what, &caches_gpu, &cpu_caches);
        // The routes are those of the rows the GPU normalised (the CPU's own rows differ by
        // bf16's rounding, which may reorder near ties).
        let want_routes = cpu.route(&then_cpu.router, &normed_gpu, n);
        assert_eq!(routes.len(), n, "{what}");
        for (r, (g, w)) in routes.iter().zip(&want_routes).enumerate() {
            assert_eq!(g.experts, w.experts, "{what}: row {r}");
            for (a, b) in g.weights.iter().zip(&w.weights) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                    "{what}: row {r}: {a} against {b}"
                );
            }
        }
    }
}

/// MLA's query path on the GPU (`linear_norm_linear`: a product, RMSNorm of the leading columns
/// of its output, a second product) against the CPU backend's, in one round trip, with f32 and
/// with bf16 weights (whose activations the GPU rounds to bf16: 2% of the largest output).
#[cfg(feature = "cuda")]
#[test]
fn cuda_query_path_matches_the_cpu_in_one_round_trip() {
    use moebius_worker::backend::{Backend, CpuBackend};
    use rand::SeedableRng;

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let (m, hidden, stacked, rank, out_rows) = (3, 64, 56, 40, 48);
    let mut random = |n: usize| gpu::random(&mut rng, n);
    let x = random(m * hidden);
    let norm = random(rank);
    let (wa, wb) = (random(stacked * hidden), random(out_rows * rank));
    for bf16 in [false, true] {
        let make = |rows: usize, cols: usize, w: &[f32]| {
            if bf16 {
                gpu::bf16_pair(&gpu, &cpu, (rows, cols), w)
            } else {
                (
                    gpu.matrix(rows, cols, w.to_vec()),
                    cpu.matrix(rows, cols, w.to_vec()),
                )
            }
        };
        let (a, b) = (make(stacked, hidden, &wa), make(out_rows, rank, &wb));
        let (mut first_gpu, mut out_gpu) =
            (vec![f32::NAN; m * stacked], vec![f32::NAN; m * out_rows]);
        let (mut first_cpu, mut out_cpu) = (first_gpu.clone(), out_gpu.clone());
        let before = gpu.transfers();
        gpu.linear_norm_linear(
            &x,
            m,
            (&a.0, &b.0),
            (&norm, 1e-6),
            &mut first_gpu,
            &mut out_gpu,
        );
        assert_eq!(
            gpu.transfers().waits - before.waits,
            1,
            "the query path is one round trip"
        );
        cpu.linear_norm_linear(
            &x,
            m,
            (&a.1, &b.1),
            (&norm, 1e-6),
            &mut first_cpu,
            &mut out_cpu,
        );
        for (what, got, want) in [
            ("first", &first_gpu, &first_cpu),
            ("out", &out_gpu, &out_cpu),
        ] {
            let scale = want.iter().fold(0.0f32, |s, w| s.max(w.abs()));
            let worst = got
                .iter()
                .zip(want)
                .fold(0.0f32, |s, (g, w)| s.max((g - w).abs()));
            let bar = if bf16 {
                0.02 * scale
            } else {
                1e-4 * scale.max(1.0)
            };
            assert!(
                worst <= bar,
                "bf16 {bf16}, {what}: off by {worst} at a scale of {scale}"
            );
        }
    }
}

/// A MoE gate routes on the GPU in one round trip and picks the CPU's experts with the CPU's
/// weights: each routing method, f32 and bf16 gate weights; only the routes come back (two
/// values per pick). A gate of more experts than `gate_route` takes routes on the host after
/// its product on the GPU, with the same result.
#[cfg(feature = "cuda")]
#[test]
fn cuda_gate_routes_as_the_cpu_in_one_round_trip() {
    use moebius_worker::backend::grid::ROUTE_MAX_EXPERTS;
    use moebius_worker::backend::{Backend, CpuBackend, Router};
    use moebius_worker::config::TopkMethod;
    use rand::SeedableRng;

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    let (n, hidden) = (5, 32);
    let x = gpu::random(&mut rng, n * hidden);
    let cases = [
        (TopkMethod::NoauxTc, 64, (8, 4), 6, false),
        (TopkMethod::NoauxTc, 64, (8, 4), 6, true),
        (TopkMethod::Greedy, 40, (1, 1), 4, false),
        (TopkMethod::GroupLimitedGreedy, 48, (4, 2), 5, true),
        (TopkMethod::Greedy, ROUTE_MAX_EXPERTS + 8, (1, 1), 8, false),
    ];
    for (method, experts, (n_group, topk_group), top_k, bf16) in cases {
        let w = gpu::random(&mut rng, experts * hidden);
        let (w_gpu, w_cpu) = if bf16 {
            gpu::bf16_pair(&gpu, &cpu, (experts, hidden), &w)
        } else {
            let (a, b) = (w.clone(), w);
            (
                gpu.matrix(experts, hidden, a),
                cpu.matrix(experts, hidden, b),
            )
        };
        let bias = gpu::random(&mut rng, experts);
        let router = Router {
            weight: &w_gpu,
            correction_bias: (method == TopkMethod::NoauxTc).then_some(&bias[..]),
            method,
            experts,
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: true,
            scaling: 2.5,
        };
        // bf16 weights multiply bf16-rounded inputs on the GPU: the CPU does the same here.
        let x_cpu: Vec<f32> = if bf16 {
            x.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        } else {
            x.clone()
        };
        let want = cpu.route(&router.with_weight(&w_cpu), &x_cpu, n);
        let before = gpu.transfers();
        let got = gpu.route(&router, &x, n);
        let after = gpu.transfers();
        let what = format!("{method:?} of {experts} experts, bf16 {bf16}");
        assert_eq!(after.waits - before.waits, 1, "{what}: one round trip");
        if experts <= ROUTE_MAX_EXPERTS {
            let routes_bytes = (2 * n * top_k * 4) as u64;
            assert_eq!(after.downloaded - before.downloaded, routes_bytes, "{what}");
        }
        assert_eq!(got.len(), n, "{what}");
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.experts, w.experts, "{what}, row {r}");
            for (a, b) in g.weights.iter().zip(&w.weights) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1e-2),
                    "{what}, row {r}: {a} against {b}"
                );
            }
        }
    }
}

/// The LM head gives each row what its sampler wants, in one round trip: the best few logits
/// (the CPU's tokens, values and log-sum-exp) where it asks for at most `LOGITS_BEST_MAX`,
/// every logit where it asks for all or for more, nothing where it asks for nothing; and only
/// that comes back.
#[cfg(feature = "cuda")]
#[test]
fn cuda_lm_head_gives_each_row_what_it_wants_in_one_round_trip() {
    use moebius_worker::backend::grid::LOGITS_BEST_MAX;
    use moebius_worker::backend::{Backend, BestLogits, CpuBackend, RowLogits, Wants};
    use rand::SeedableRng;

    let Some(gpu) = gpu::open() else { return };
    let cpu = CpuBackend::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let (vocab, hidden) = (300, 32);
    let w = gpu::random(&mut rng, vocab * hidden);
    let (w_gpu, w_cpu) = (
        gpu.matrix(vocab, hidden, w.clone()),
        cpu.matrix(vocab, hidden, w),
    );
    let more = LOGITS_BEST_MAX + 8;
    let wants = [
        Wants::Best(1),
        Wants::Nothing,
        Wants::All,
        Wants::Best(5),
        Wants::Best(more),
        Wants::Best(20),
    ];
    let x = gpu::random(&mut rng, wants.len() * hidden);
    let mut logits = vec![0.0; wants.len() * vocab];
    cpu.linear(&x, wants.len(), &w_cpu, &mut logits);
    let before = gpu.transfers();
    let got = gpu.lm_head(&x, &w_gpu, &wants);
    let after = gpu.transfers();
    assert_eq!(after.waits - before.waits, 1, "one round trip");
    // The best 20 (the most asked for) and a log-sum-exp of each of 3 rows, and every logit
    // of 2.
    let bytes = (3 * (2 * 20 + 1) + 2 * vocab) * 4;
    assert_eq!(after.downloaded - before.downloaded, bytes as u64);
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    for (r, (want, got)) in wants.iter().zip(&got).enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        match (want, got) {
            (Wants::Nothing, RowLogits::Nothing) => {}
            (Wants::All, RowLogits::All(all)) => {
                assert!(all.iter().zip(row).all(|(&a, &b)| close(a, b)), "row {r}");
            }
            (&Wants::Best(k), RowLogits::All(all)) if k == more => {
                assert!(all.iter().zip(row).all(|(&a, &b)| close(a, b)), "row {r}");
            }
            (&Wants::Best(k), RowLogits::Best(best)) => {
                let cpu_best = BestLogits::of(row, k);
                assert_eq!(best.ids, cpu_best.ids, "row {r}");
                let values = best.values.iter().zip(&cpu_best.values);
                assert!(values.into_iter().all(|(&a, &b)| close(a, b)), "row {r}");
                assert!(close(best.log_sum, cpu_best.log_sum), "row {r}");
            }
            (want, got) => panic!("row {r} wants {want:?} and got {got:?}"),
        }
    }
}

/// With `--fp8-activations`, FP8 weights' products of more than 8 rows run on tensor cores
/// (Hopper, cuBLASLt 12.9 or later): the activations quantised in 1 × 128 blocks as the CPU's
/// `quantize_activations` does, and the product that of the dequantised codes to f32 rounding,
/// which pins down how cuBLASLt reads both kinds of scales; a weight whose last blocks are
/// partial too; two launches a product. The FP8 fixture still gives transformers' first
/// tokens (its logprobs move by FP8's rounding, printed). Skips, saying why, where the GPU or
/// library has no such products; the stand-in must have them.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fp8_activations_on_tensor_cores_multiply_the_quantised_values() {
    use moebius_worker::backend::cuda::CudaBackend;
    use moebius_worker::backend::Backend;
    use moebius_worker::checkpoint::{e4m3fn_value, quantize_activations, Fp8Blocks};
    use rand::{Rng, SeedableRng};

    let Some(plain) = gpu::open() else { return };
    let stand_in = plain.device_name().starts_with("cuda_host");
    drop(plain);
    let gpu = CudaBackend::open_with(0, 1, true).expect("the GPU opens again");
    if !gpu.has_fp8_tensor_cores() {
        assert!(
            !stand_in,
            "the stand-in has FP8 tensor cores (see the log for why not)"
        );
        eprintln!("skipped: no FP8 tensor cores here (the log says why)");
        return;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    for (n, k, m) in [(256usize, 384usize, 40usize), (144, 208, 9)] {
        let blocks = Fp8Blocks {
            rows: n,
            cols: k,
            codes: (0..n * k)
                .map(|_| rng.random_range(0..0x7eu8) | (rng.random::<u8>() & 0x80))
                .collect(),
            scales: (0..n.div_ceil(128) * k.div_ceil(128))
                .map(|_| rng.random_range(1e-3..2e-3))
                .collect(),
            block: (128, 128),
        };
        let w = blocks.dequantize();
        let on_gpu = gpu.matrix_fp8(blocks);
        let x = gpu::random(&mut rng, m * k);
        let (codes, scales) = quantize_activations(&x, k);
        let per_row = k.div_ceil(128);
        let quantised: Vec<f64> = (codes.iter().enumerate())
            .map(|(i, &c)| f64::from(e4m3fn_value(c) * scales[i / k * per_row + i % k / 128]))
            .collect();
        let mut got = vec![f32::NAN; m * n];
        let before = gpu.transfers();
        gpu.linear(&x, m, &on_gpu, &mut got);
        let launches = gpu.transfers().launches - before.launches;
        assert_eq!(launches, 2, "{n}×{k}: quantise, multiply");
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|l| quantised[i * k + l] * f64::from(w[j * k + l]));
                let (want, size): (f64, f64) =
                    terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                let got = f64::from(got[i * n + j]);
                assert!(
                    (got - want).abs() <= 1e-5 * size.max(1e-6),
                    "{n}×{k}, y[{i}, {j}] = {got}, want {want}"
                );
            }
        }
    }
    let backend = std::sync::Arc::new(gpu);
    let golden = golden::golden("tiny-v3-fp8");
    let model = gpu::model(&golden::fixture("tiny-v3-fp8"), backend);
    let mut worst = 0.0f32;
    for case in &golden.cases {
        let (tokens, logprobs) = gpu::greedy(&model, &case.prompt_ids, 1);
        assert_eq!(
            tokens[0], case.new_token_ids[0],
            "{}: first token",
            case.name
        );
        worst = worst.max((logprobs[0] - case.logprobs[0]).abs());
    }
    eprintln!(
        "tiny-v3-fp8 with FP8 activations: first logprobs within {worst:.2e} of transformers'"
    );
}
