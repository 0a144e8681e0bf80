//! The CUDA backend's kernels (`src/backend/nvrtc.cu`), run on the CPU under `cuda_host.h`'s
//! model of CUDA threads and checked against the CPU backend's functions. They show that each
//! kernel computes the right values with the launch shape the backend uses ([`grid`]); they do
//! not show that it runs on a GPU, which only `scripts/gpu_check.sh` on a GPU does.

mod cuda_host;

use cuda_host::{kernel_names, Args, HostKernels};
use moebius_worker::backend::grid::{self, FP8_GEMV_ROWS};
use moebius_worker::backend::{BestLogits, Rotation, Router};
use moebius_worker::checkpoint::{e4m3fn_value, quantize_activations, Fp8Blocks};
use moebius_worker::config::TopkMethod;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every kernel of nvrtc.cu, each with a test below.
const TESTED: &[&str] = &[
    "fp8_gemv",
    "fp8_gemv_grouped",
    "fp8_to_bf16",
    "silu_mul",
    "causal_softmax",
    "paged_rows",
    "heads_copy",
    "rms_norm",
    "rope_rotate",
    "gate_route",
    "logits_best",
    "quantize_fp8_rows",
    "add_into",
];

#[test]
fn every_kernel_has_a_test() {
    let source = include_str!("../src/backend/nvrtc.cu");
    let names = kernel_names(source);
    assert!(!names.is_empty(), "no kernels found in nvrtc.cu");
    for name in &names {
        assert!(
            TESTED.contains(&name.as_str()),
            "kernel {name} has no test here"
        );
    }
    assert_eq!(names.len(), TESTED.len(), "{names:?} against {TESTED:?}");
}

/// A weight of `rows × cols` random finite codes, with blocks of `block` that the edges cut.
fn fp8_weight(rng: &mut ChaCha8Rng, rows: usize, cols: usize, block: (usize, usize)) -> Fp8Blocks {
    let codes = (0..rows * cols)
        .map(|_| loop {
            let code: u8 = rng.random();
            if code & 0x7f != 0x7f {
                break code; // not NaN
            }
        })
        .collect();
    let scale_count = rows.div_ceil(block.0) * cols.div_ceil(block.1);
    let scales = (0..scale_count)
        .map(|_| rng.random_range(0.001f32..0.01))
        .collect();
    Fp8Blocks {
        rows,
        cols,
        codes,
        scales,
        block,
    }
}

fn values(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

#[test]
fn fp8_gemv_matches_the_dequantised_product() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    // 37 rows: a last block of 8 weight rows (warps) with 5 live; 50 columns in blocks of 8 and
    // rows in blocks of 4, both cut at the edge (one code a lane); then 300 columns in blocks of
    // 128 (four codes a lane, the last block cut); every row count the kernel takes.
    for (n, k, block) in [(37, 50, (4, 8)), (37, 300, (16, 128))] {
        fp8_gemv_case(&mut rng, n, k, block);
    }
}

fn fp8_gemv_case(rng: &mut ChaCha8Rng, n: usize, k: usize, block: (usize, usize)) {
    let w = fp8_weight(rng, n, k, block);
    let dense = w.dequantize();
    for m in [1, 3, FP8_GEMV_ROWS] {
        let x = values(rng, m * k);
        let y = fp8_gemv(&w, &x, m);
        for i in 0..m {
            for r in 0..n {
                let terms = (0..k).map(|c| f64::from(x[i * k + c]) * f64::from(dense[r * k + c]));
                let want: f64 = terms.clone().sum();
                let scale: f64 = terms.map(f64::abs).sum();
                let got = f64::from(y[i * n + r]);
                assert!(
                    (got - want).abs() <= 1e-5 * scale.max(1e-6),
                    "k={k} m={m} y[{i}, {r}] = {got}, want {want}"
                );
            }
        }
    }
}

/// `fp8_gemv` of `m` rows of `x` by `w`, launched as the backend launches it.
fn fp8_gemv(w: &Fp8Blocks, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k);
    let mut y = vec![f32::NAN; m * n];
    let args = Args::default()
        .arg(w.codes.as_ptr())
        .arg(w.scales.as_ptr())
        .arg(x.as_ptr())
        .arg(y.as_mut_ptr())
        .arg(n as i32)
        .arg(k as i32)
        .arg(m as i32)
        .arg(w.block.0 as i32)
        .arg(w.block.1 as i32);
    // SAFETY: the buffers hold the n × k codes, their scale grid, m × k inputs and m × n
    // outputs.
    unsafe { HostKernels::get().launch("fp8_gemv", grid::fp8_gemv(n), args) };
    y
}

/// `nvrtc.cu`'s `Fp8Product`, as the backend lays it out.
#[repr(C)]
struct Fp8Product {
    w: *const u8,
    scales: *const f32,
    x: *const f32,
    y: *mut f32,
    n: i32,
    k: i32,
    m: i32,
    br: i32,
    bc: i32,
}

/// `fp8_gemv_grouped` gives each product of a launch what `fp8_gemv` gives it alone, bit for
/// bit: products of other row counts (the grid's x extent is the longest one's, so shorter
/// ones have blocks to spare), widths, blocks and activation rows.
#[test]
fn fp8_gemv_grouped_gives_each_product_what_fp8_gemv_does() {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let shapes = [
        (37, 50, (4, 8), 1),
        (9, 300, (16, 128), 3),
        (80, 64, (128, 128), 8),
    ];
    let weights: Vec<Fp8Blocks> = shapes
        .iter()
        .map(|&(n, k, block, _)| fp8_weight(&mut rng, n, k, block))
        .collect();
    let inputs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, k, _, m)| values(&mut rng, m * k))
        .collect();
    let alone: Vec<Vec<f32>> = (weights.iter().zip(&inputs).zip(&shapes))
        .map(|((w, x), &(_, _, _, m))| fp8_gemv(w, x, m))
        .collect();
    let mut grouped: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(n, _, _, m)| vec![f32::NAN; m * n])
        .collect();
    let table: Vec<Fp8Product> = (weights.iter().zip(&inputs).zip(&mut grouped).zip(&shapes))
        .map(|(((w, x), y), &(n, k, block, m))| Fp8Product {
            w: w.codes.as_ptr(),
            scales: w.scales.as_ptr(),
            x: x.as_ptr(),
            y: y.as_mut_ptr(),
            n: n as i32,
            k: k as i32,
            m: m as i32,
            br: block.0 as i32,
            bc: block.1 as i32,
        })
        .collect();
    let most_rows = shapes.iter().map(|s| s.0).max().unwrap_or(0);
    let args = Args::default().arg(table.as_ptr());
    // SAFETY: each entry's buffers hold its product's codes, scales, inputs and outputs, and
    // the grid's y extent is the table's length.
    unsafe {
        HostKernels::get().launch(
            "fp8_gemv_grouped",
            grid::fp8_gemv_grouped(most_rows, table.len()),
            args,
        )
    };
    drop(table);
    for (i, (g, a)) in grouped.iter().zip(&alone).enumerate() {
        assert!(
            g.iter().all(|v| v.is_finite()),
            "product {i} has values left unwritten"
        );
        assert_eq!(
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "product {i}"
        );
    }
}

#[test]
fn fp8_to_bf16_rounds_the_dequantised_weight_to_nearest_even() {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let (n, k, block) = (19, 300, (8, 128));
    let w = fp8_weight(&mut rng, n, k, block);
    let mut out = vec![0u16; n * k];
    let args = Args::default()
        .arg(w.codes.as_ptr())
        .arg(w.scales.as_ptr())
        .arg(out.as_mut_ptr())
        .arg(n as i32)
        .arg(k as i32)
        .arg(block.0 as i32)
        .arg(block.1 as i32);
    // SAFETY: the buffers hold the n × k codes, their scale grid and n × k outputs.
    unsafe { HostKernels::get().launch("fp8_to_bf16", grid::elementwise(n * k), args) };
    for (i, (&got, want)) in out.iter().zip(w.dequantize()).enumerate() {
        assert_eq!(
            got,
            half::bf16::from_f32(want).to_bits(),
            "value {i}: {want}"
        );
    }
}

#[test]
fn silu_mul_matches_the_cpu_into_f32_and_into_bf16() {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let (rows, width) = (5, 300);
    let gate_up: Vec<f32> = (0..rows * 2 * width)
        .map(|_| rng.random_range(-8.0f32..8.0))
        .collect();
    let mut want = vec![0.0; rows * width];
    moebius_worker::backend::silu_mul(&gate_up, width, &mut want);

    let launch = |f32_out: *mut f32, bf16_out: *mut u16| {
        let args = Args::default()
            .arg(gate_up.as_ptr())
            .arg(f32_out)
            .arg(bf16_out)
            .arg(rows as i32)
            .arg(width as i32);
        // SAFETY: gate_up holds rows × 2·width values and the output that is not null
        // rows × width.
        unsafe { HostKernels::get().launch("silu_mul", grid::elementwise(rows * width), args) };
    };
    check_f32_and_bf16(&want, (1e-6, 1e-6), launch);
}

/// `nvrtc.cu`'s `SoftmaxPart`, as the backend lays it out.
#[repr(C)]
struct SoftmaxPart {
    scores: *mut f32,
    rows: i32,
    cols: i32,
    heads: i32,
    first: i32,
}

/// `causal_softmax` softmaxes each part of a launch as the CPU does row by row: 3 queries × 4
/// heads over 600 keys (more than a block's threads), the first query seeing 598, so every
/// row has masked columns but the last query's; and beside it a part of 2 queries × 3 heads
/// over 40 keys. Launched as the backend launches it, and with fewer blocks than rows, whose
/// blocks take several rows each.
#[test]
fn causal_softmax_matches_the_cpu_row_by_row() {
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    let scale = 0.3f32;
    // (queries, heads, cols, first) of each part.
    let shapes = [(3usize, 4usize, 600usize, 598usize), (2, 3, 40, 39)];
    for blocks in [None, Some(5)] {
        let mut parts_scores: Vec<Vec<f32>> = shapes
            .iter()
            .map(|&(q, h, cols, _)| {
                (0..q * h * cols)
                    .map(|_| rng.random_range(-20.0..20.0))
                    .collect()
            })
            .collect();
        let want: Vec<Vec<f32>> = (parts_scores.iter().zip(&shapes))
            .map(|(scores, &(_, heads, cols, first))| {
                let mut want = scores.clone();
                for (r, row) in want.chunks_exact_mut(cols).enumerate() {
                    moebius_worker::backend::attend::causal_softmax(row, first + r / heads, scale);
                }
                want
            })
            .collect();
        let parts: Vec<SoftmaxPart> = (parts_scores.iter_mut().zip(&shapes))
            .map(|(scores, &(q, heads, cols, first))| SoftmaxPart {
                scores: scores.as_mut_ptr(),
                rows: (q * heads) as i32,
                cols: cols as i32,
                heads: heads as i32,
                first: first as i32,
            })
            .collect();
        let most_rows = shapes.iter().map(|s| s.0 * s.1).max().unwrap_or(0);
        let mut shape = grid::causal_softmax(most_rows, parts.len());
        if let Some(blocks) = blocks {
            shape.blocks.0 = blocks;
        }
        let args = Args::default().arg(parts.as_ptr()).arg(scale);
        // SAFETY: each part's scores hold its rows × cols values.
        unsafe { HostKernels::get().launch("causal_softmax", shape, args) };
        for (p, (got, want)) in parts_scores.iter().zip(&want).enumerate() {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                    "blocks {blocks:?}, part {p}, score {i}: {g}, want {w}"
                );
            }
        }
    }
}

/// Writes rows into a paged cache and reads them back through `paged_rows`, with the pages out
/// of order in memory and the rows starting and ending inside pages.
#[test]
fn paged_rows_write_and_read_the_rows_where_the_page_table_says() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (width, page_rows) = (600usize, grid::PAGE_ROWS);
    // 5 pages, laid out in memory in the order 3, 0, 4, 1, 2 of the table.
    let mut memory = vec![f32::NAN; 5 * page_rows * width];
    let page_len = page_rows * width;
    let base = memory.as_mut_ptr() as u64;
    let order = [1usize, 3, 4, 0, 2];
    let table: Vec<u64> = order
        .iter()
        .map(|&slot| base + (slot * page_len * 4) as u64)
        .collect();
    let copy = |flat: &mut [f32], pages: &[u64], first: usize, rows: usize, to_pages: bool| {
        let args = Args::default()
            .arg(flat.as_mut_ptr())
            .arg(pages.as_ptr())
            .arg(first as i32)
            .arg(rows as i32)
            .arg(width as i32)
            .arg(page_rows as i32)
            .arg(i32::from(to_pages));
        // SAFETY: flat holds rows × width values, and every page the rows fall in holds
        // page_rows × width values of `memory`.
        unsafe { HostKernels::get().launch("paged_rows", grid::paged_rows(rows), args) };
    };
    // Rows 5..70 of the cache: from inside page 0 to inside page 4.
    let (first, rows) = (5usize, 65usize);
    let mut written = values(&mut rng, rows * width);
    copy(&mut written, &table, first, rows, true);
    for r in 0..rows {
        let g = first + r;
        let at = order[g / page_rows] * page_len + (g % page_rows) * width;
        assert_eq!(
            memory[at..at + width],
            written[r * width..(r + 1) * width],
            "row {g} is not where its page says"
        );
    }
    // A table that starts at page 1, as an append after 16 rows passes it.
    let mut read = vec![f32::NAN; 20 * width];
    copy(&mut read, &table[1..], 0, 20, false);
    assert_eq!(
        read[..],
        written[(16 - first) * width..(36 - first) * width]
    );
}

/// `heads_copy` moves per-head column slices between layouts: the no-positional columns of
/// queries `[rows, heads, 24]` into a head-major `[heads, rows, 16]` in f32 and in bf16, and
/// those back into columns 4.. of `[rows, heads, 30]`.
#[test]
fn heads_copy_moves_each_heads_columns() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (rows, heads) = (5usize, 3usize);
    let q = values(&mut rng, rows * heads * 24);
    let copy = |src: &[f32],
                src_at: (usize, usize, usize),
                dst: (*mut f32, *mut u16),
                dst_at: (usize, usize, usize),
                cols: usize| {
        let args = Args::default()
            .arg(src.as_ptr())
            .arg(src_at.0 as i32)
            .arg(src_at.1 as i32)
            .arg(src_at.2 as i32)
            .arg(dst.0)
            .arg(dst.1)
            .arg(dst_at.0 as i32)
            .arg(dst_at.1 as i32)
            .arg(dst_at.2 as i32)
            .arg(rows as i32)
            .arg(heads as i32)
            .arg(cols as i32);
        // SAFETY: every (row, head, column) the strides reach lies in `src` and the output.
        unsafe {
            HostKernels::get().launch("heads_copy", grid::elementwise(rows * heads * cols), args)
        };
    };
    let mut per_head = vec![f32::NAN; heads * rows * 16];
    copy(
        &q,
        (heads * 24, 24, 0),
        (per_head.as_mut_ptr(), std::ptr::null_mut()),
        (16, rows * 16, 0),
        16,
    );
    let mut per_head_bf16 = vec![0u16; heads * rows * 16];
    copy(
        &q,
        (heads * 24, 24, 0),
        (std::ptr::null_mut(), per_head_bf16.as_mut_ptr()),
        (16, rows * 16, 0),
        16,
    );
    for r in 0..rows {
        for h in 0..heads {
            for c in 0..16 {
                let want = q[(r * heads + h) * 24 + c];
                assert_eq!(per_head[(h * rows + r) * 16 + c], want, "({r}, {h}, {c})");
                assert_eq!(
                    per_head_bf16[(h * rows + r) * 16 + c],
                    half::bf16::from_f32(want).to_bits()
                );
            }
        }
    }
    let mut back = vec![f32::NAN; rows * heads * 30];
    copy(
        &per_head,
        (16, rows * 16, 0),
        (back.as_mut_ptr(), std::ptr::null_mut()),
        (heads * 30, 30, 4),
        16,
    );
    for r in 0..rows {
        for h in 0..heads {
            let row = &back[(r * heads + h) * 30..(r * heads + h + 1) * 30];
            assert!(
                row[..4].iter().chain(&row[20..]).all(|v| v.is_nan()),
                "columns outside were written"
            );
            assert_eq!(
                row[4..20],
                q[(r * heads + h) * 24..(r * heads + h) * 24 + 16]
            );
        }
    }
}

/// `rms_norm` normalises the leading 300 of 340 columns of each row as the CPU backend does,
/// into f32, into bf16, and into both at once.
#[test]
fn rms_norm_matches_the_cpu_into_f32_and_into_bf16() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (rows, cols, stride, eps) = (4usize, 300usize, 340usize, 1e-6f32);
    let x = values(&mut rng, rows * stride);
    let weight = values(&mut rng, cols);
    let mut want: Vec<f32> = x
        .chunks_exact(stride)
        .flat_map(|row| &row[..cols])
        .copied()
        .collect();
    moebius_worker::backend::rms_norm(&mut want, &weight, eps);
    let launch = |f32_out: *mut f32, bf16_out: *mut u16| {
        let args = Args::default()
            .arg(x.as_ptr())
            .arg(stride as i32)
            .arg(weight.as_ptr())
            .arg(eps)
            .arg(f32_out)
            .arg(bf16_out)
            .arg(rows as i32)
            .arg(cols as i32);
        // SAFETY: x holds rows × stride values, weight cols, and each output that is not null
        // rows × cols.
        unsafe { HostKernels::get().launch("rms_norm", grid::rms_norm(rows), args) };
    };
    check_f32_and_bf16(&want, (1e-5, 1e-3), launch);
    let (mut wide, mut narrow) = (vec![f32::NAN; rows * cols], vec![0u16; rows * cols]);
    launch(wide.as_mut_ptr(), std::ptr::null_mut());
    let (mut both_wide, mut both_narrow) = (vec![f32::NAN; rows * cols], vec![0u16; rows * cols]);
    launch(both_wide.as_mut_ptr(), both_narrow.as_mut_ptr());
    launch(std::ptr::null_mut(), narrow.as_mut_ptr());
    assert_eq!(
        (both_wide, both_narrow),
        (wide, narrow),
        "both outputs at once"
    );
}

/// `rope_rotate` turns the rotary columns (8 of 12, from column 4) of every head of 3 rows as
/// the CPU's [`Rotation`] does, in both pairings, and leaves the other columns alone.
#[test]
fn rope_rotate_matches_the_cpus_rotation() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let (rows, heads, width, col, pairs) = (3usize, 2usize, 12usize, 4usize, 4usize);
    let x = values(&mut rng, rows * heads * width);
    let angles: Vec<f32> = (0..rows * pairs)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let mut cos_sin: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
    for interleave in [false, true] {
        let rotation = Rotation {
            cos_sin,
            interleave,
        };
        let mut want = x.clone();
        for (r, row) in want.chunks_exact_mut(heads * width).enumerate() {
            for head in row.chunks_exact_mut(width) {
                rotation.apply(r, &mut head[col..col + 2 * pairs]);
            }
        }
        let mut got = x.clone();
        let args = Args::default()
            .arg(got.as_mut_ptr())
            .arg((heads * width) as i32)
            .arg(width as i32)
            .arg(col as i32)
            .arg(rows as i32)
            .arg(heads as i32)
            .arg(pairs as i32)
            .arg(rotation.cos_sin.as_ptr())
            .arg(i32::from(interleave));
        // SAFETY: every (row, head) of x holds `width` values, columns col .. col + 2 * pairs
        // among them, and cos_sin rows × pairs pairs.
        unsafe {
            HostKernels::get().launch("rope_rotate", grid::elementwise(rows * heads * pairs), args)
        };
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6,
                "interleave {interleave}, value {i}: {g}, want {w}"
            );
            if i % width < col || i % width >= col + 2 * pairs {
                assert_eq!(g, x[i], "value {i} is not rotary but changed");
            }
        }
        assert_ne!(got, x, "nothing rotated");
        cos_sin = rotation.cos_sin;
    }
}

/// `gate_route` picks the experts the CPU's [`Router::route_row`] picks, in the same order, with
/// their weights, for every row of a launch: each routing method; more experts than a block
/// has threads; groups of one expert; more experts than the kept groups hold (the masked ones
/// then taken by index); and rows of tied pairs, whose ties go to the lower index.
#[test]
fn gate_route_matches_the_cpus_router() {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let router = |method, experts, (n_group, topk_group), top_k, norm_topk_prob| Router {
        weight: &(),
        correction_bias: None,
        method,
        experts,
        top_k,
        n_group,
        topk_group,
        norm_topk_prob,
        scaling: 2.5,
    };
    let cases = [
        router(TopkMethod::NoauxTc, 64, (8, 3), 6, true),
        router(TopkMethod::NoauxTc, 300, (10, 4), 8, false),
        router(TopkMethod::NoauxTc, 12, (12, 5), 3, true),
        router(TopkMethod::NoauxTc, 16, (8, 1), 4, true),
        router(TopkMethod::Greedy, 20, (1, 1), 4, false),
        router(TopkMethod::GroupLimitedGreedy, 24, (4, 2), 5, false),
        router(TopkMethod::GroupLimitedGreedy, 300, (6, 2), 7, false),
    ];
    let rows = 4;
    for case in cases {
        for ties in [false, true] {
            let experts = case.experts;
            let mut logits = values(&mut rng, rows * experts);
            let mut bias: Vec<f32> = (0..experts).map(|_| rng.random_range(-0.1..0.1)).collect();
            if ties {
                for e in (1..logits.len()).step_by(2) {
                    logits[e] = logits[e - 1];
                }
                bias.fill(0.0);
            }
            let router = Router {
                correction_bias: (case.method == TopkMethod::NoauxTc).then_some(&bias[..]),
                ..case.with_weight(&())
            };
            let k = router.top_k;
            let got = route_rows(&router, &logits, rows);
            for (r, row) in logits.chunks_exact(experts).enumerate() {
                let want = router.route_row(row);
                let what = format!(
                    "{:?} of {experts} experts, ties {ties}, row {r}",
                    router.method
                );
                let picked = &got[(rows + r) * k..(rows + r + 1) * k];
                let picked: Vec<usize> = picked.iter().map(|&e| e as usize).collect();
                assert_eq!(picked, want.experts, "{what}");
                let weights = &got[r * k..(r + 1) * k];
                for (i, (&g, &w)) in weights.iter().zip(&want.weights).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{what}, weight {i}: {g}, want {w}"
                    );
                }
            }
        }
    }
}

/// `gate_route` of `rows` rows of `logits`, launched as the backend launches it: the weights,
/// then the experts, `top_k` a row.
fn route_rows(router: &Router<'_, ()>, logits: &[f32], rows: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; 2 * rows * router.top_k];
    let bias = router
        .correction_bias
        .map_or(std::ptr::null(), <[f32]>::as_ptr);
    let args = Args::default()
        .arg(logits.as_ptr())
        .arg(rows as i32)
        .arg(router.experts as i32)
        .arg(bias)
        .arg(grid::gate_route_method(router.method))
        .arg(router.n_group as i32)
        .arg(router.topk_group as i32)
        .arg(router.top_k as i32)
        .arg(i32::from(router.norm_topk_prob))
        .arg(router.scaling)
        .arg(out.as_mut_ptr());
    // SAFETY: logits holds rows × experts values, the bias (noaux_tc's) experts, and out
    // 2 × rows × top_k.
    unsafe { HostKernels::get().launch("gate_route", grid::gate_route(rows), args) };
    out
}

/// `logits_best` gives each row's best logits and token ids in the CPU's order (ties to the
/// lower id) and its log-sum-exp: a vocabulary of more entries than a block has threads, a
/// row of tied pairs, and as many best as greedy decoding, top-k sampling and the most
/// alternatives ask for.
#[test]
fn logits_best_matches_the_cpus_reduction() {
    let mut rng = ChaCha8Rng::seed_from_u64(26);
    let (rows, vocab) = (3, 1000);
    let mut logits: Vec<f32> = values(&mut rng, rows * vocab)
        .iter()
        .map(|v| v * 12.0)
        .collect();
    for c in (1..vocab).step_by(2) {
        logits[vocab + c] = logits[vocab + c - 1];
    }
    for k in [1, 5, grid::LOGITS_BEST_MAX] {
        let mut out = vec![f32::NAN; rows * (2 * k + 1)];
        let args = Args::default()
            .arg(logits.as_ptr())
            .arg(rows as i32)
            .arg(vocab as i32)
            .arg(k as i32)
            .arg(out.as_mut_ptr());
        // SAFETY: logits holds rows × vocab values and out rows × (2k + 1).
        unsafe { HostKernels::get().launch("logits_best", grid::logits_best(rows), args) };
        for (r, (row, got)) in logits
            .chunks_exact(vocab)
            .zip(out.chunks_exact(2 * k + 1))
            .enumerate()
        {
            let want = BestLogits::of(row, k);
            let ids: Vec<u32> = got[k..2 * k].iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want.ids, "k {k}, row {r}");
            assert_eq!(got[..k], want.values, "k {k}, row {r}");
            let log_sum = got[2 * k];
            assert!(
                (log_sum - want.log_sum).abs() <= 1e-6 * want.log_sum.abs(),
                "k {k}, row {r}: log-sum-exp {log_sum}, want {}",
                want.log_sum
            );
        }
    }
}

/// `quantize_fp8_rows` gives each block of 128 values of a row its scale (the largest |value|
/// / 448) and each value the E4M3FN code nearest to value / scale, ties to the even code, as
/// the CPU's `quantize_activations` does: rows of 300 values (a last block of 44), with values
/// across the codes' whole range, exact ties between neighbouring codes, and a block of zeros.
#[test]
fn quantize_fp8_rows_rounds_each_block_to_the_nearest_codes() {
    let mut rng = ChaCha8Rng::seed_from_u64(27);
    let (rows, k) = (3usize, 300usize);
    let mut x: Vec<f32> = (0..rows * k)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-12..4)))
        .collect();
    // Row 1's first block: 448 sets the scale to 1, so the others are exact ties of codes.
    x[k] = 448.0;
    for c in 1..64 {
        let code = rng.random_range(0..0x7du8);
        x[k + c] = (e4m3fn_value(code) + e4m3fn_value(code + 1)) / 2.0;
    }
    x[2 * k + 128..2 * k + 256].fill(0.0);
    let blocks = k.div_ceil(128);
    let (mut codes, mut scales) = (vec![0xffu8; rows * k], vec![f32::NAN; rows * blocks]);
    let args = Args::default()
        .arg(x.as_ptr())
        .arg(rows as i32)
        .arg(k as i32)
        .arg(codes.as_mut_ptr())
        .arg(scales.as_mut_ptr());
    // SAFETY: x holds rows × k values, codes as many and scales rows × blocks.
    unsafe {
        HostKernels::get().launch("quantize_fp8_rows", grid::quantize_fp8_rows(rows, k), args)
    };
    let (want_codes, want_scales) = quantize_activations(&x, k);
    assert_eq!(scales, want_scales);
    for (i, (&got, &want)) in codes.iter().zip(&want_codes).enumerate() {
        assert_eq!(got, want, "value {i}: {}", x[i]);
    }
}

/// `add_into` adds every value of one buffer into another, past a launch's first stride.
#[test]
fn add_into_adds_every_value() {
    let mut rng = ChaCha8Rng::seed_from_u64(28);
    let len = 3 * grid::ELEMENTWISE_THREADS as usize + 17;
    let (x, y) = (values(&mut rng, len), values(&mut rng, len));
    let mut got = y.clone();
    let mut shape = grid::elementwise(len);
    shape.blocks.0 = 2; // fewer blocks than values: each thread takes several
    let args = Args::default()
        .arg(got.as_mut_ptr())
        .arg(x.as_ptr())
        .arg(len as i64);
    // SAFETY: both buffers hold len values.
    unsafe { HostKernels::get().launch("add_into", shape, args) };
    let want: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a + b).collect();
    assert_eq!(got, want);
}

/// Runs a kernel that writes f32 or bf16 (`launch(f32_out, bf16_out)`, one of them null) both
/// ways: its f32 output within `tol` of `want` (relative, of at least `floor`), its bf16 output
/// the f32 one rounded to nearest even.
fn check_f32_and_bf16(want: &[f32], (tol, floor): (f32, f32), launch: impl Fn(*mut f32, *mut u16)) {
    let mut wide = vec![f32::NAN; want.len()];
    launch(wide.as_mut_ptr(), std::ptr::null_mut());
    for (i, (&got, &want)) in wide.iter().zip(want).enumerate() {
        assert!(
            (got - want).abs() <= tol * want.abs().max(floor),
            "value {i}: {got}, want {want}"
        );
    }
    let mut narrow = vec![0u16; want.len()];
    launch(std::ptr::null_mut(), narrow.as_mut_ptr());
    for (i, (&got, &wide)) in narrow.iter().zip(&wide).enumerate() {
        assert_eq!(
            got,
            half::bf16::from_f32(wide).to_bits(),
            "value {i}: {wide}"
        );
    }
}
