//! Tests of [`Checkpoint`] on small safetensors files written into temporary directories.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::*;

/// One tensor to write: name, dtype, shape, little-endian bytes.
type Spec<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

fn write(path: &Path, tensors: &[Spec<'_>]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes).expect("consistent spec");
            (*name, view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    let to = |v: &f32| half::bf16::from_f32(*v).to_le_bytes();
    values.iter().flat_map(to).collect()
}

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    let to = |v: &f32| half::f16::from_f32(*v).to_le_bytes();
    values.iter().flat_map(to).collect()
}

/// A directory with one `model.safetensors` holding `tensors`.
fn single(tensors: &[Spec<'_>]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("model.safetensors"), tensors);
    dir
}

/// E4M3FN by the textbook formula, independent of the table under test.
fn e4m3fn(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((code >> 3) & 0x0f);
    let m = f32::from(code & 0x07);
    if e == 0 {
        sign * m * 2f32.powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

#[test]
fn checkpoint_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
}

#[test]
fn float_dtypes_round_trip_exactly() {
    let values = [1.0, -2.5, 0.156_25, 65504.0, -6.103_515_6e-5, 0.0];
    let bf16_values = [1.0, -2.5, 3.140_625, 1.0e30, -0.007_812_5, 0.0];
    let dir = single(&[
        ("a.f32", Dtype::F32, vec![2, 3], f32_bytes(&values)),
        ("a.f16", Dtype::F16, vec![2, 3], f16_bytes(&values)),
        ("a.bf16", Dtype::BF16, vec![6], bf16_bytes(&bf16_values)),
    ]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert_eq!(ckpt.dir(), dir.path());
    assert_eq!(ckpt.load_f32("a.f32", &[2, 3]).expect("f32"), values);
    assert_eq!(ckpt.load_f32("a.f16", &[2, 3]).expect("f16"), values);
    let bf16 = ckpt.load_f32("a.bf16", &[6]).expect("bf16");
    // 1e30 is not a bf16 value; its nearest one is.
    let want = bf16_values.map(|v| half::bf16::from_f32(v).to_f32());
    assert_eq!(bf16, want);
    assert_eq!(&bf16[..3], &[1.0, -2.5, 3.140_625]);
}

#[test]
fn fp8_known_codes_with_unit_scale() {
    let codes = vec![0x38, 0x40, 0xc0, 0x7e, 0x01, 0x00];
    let dir = single(&[
        ("w.weight", Dtype::F8_E4M3, vec![1, 6], codes),
        (
            "w.weight_scale_inv",
            Dtype::F32,
            vec![1, 1],
            f32_bytes(&[1.0]),
        ),
    ]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    let w = ckpt.load_f32("w.weight", &[1, 6]).expect("fp8");
    assert_eq!(w, [1.0, 2.0, -2.0, 448.0, 2f32.powi(-9), 0.0]);
}

#[test]
fn fp8_block_dequant_with_partial_blocks() {
    let (rows, cols) = (130usize, 200usize);
    let codes: Vec<u8> = (0..rows * cols)
        .map(|k| {
            let code = ((k / cols) * 31 + (k % cols) * 7) as u8;
            // Skip the NaN codes so that the comparison is plain equality.
            if code & 0x7f == 0x7f {
                0x3f
            } else {
                code
            }
        })
        .collect();
    let scale = [0.5f32, 2.0, 0.25, 4.0];
    let scale_64 = [0.5f32, 2.0, 0.25, 4.0, 8.0, 0.125];
    let dir = single(&[
        ("w.weight", Dtype::F8_E4M3, vec![rows, cols], codes.clone()),
        (
            "w.weight_scale_inv",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&scale),
        ),
        ("v.weight", Dtype::F8_E4M3, vec![rows, cols], codes.clone()),
        (
            "v.weight_scale_inv",
            Dtype::F32,
            vec![3, 2],
            f32_bytes(&scale_64),
        ),
    ]);
    let mut ckpt = Checkpoint::open(dir.path()).expect("open");
    let w = ckpt.load_f32("w.weight", &[rows, cols]).expect("fp8");
    for i in 0..rows {
        for j in 0..cols {
            let want = e4m3fn(codes[i * cols + j]) * scale[(i / 128) * 2 + j / 128];
            assert_eq!(w[i * cols + j], want, "w[{i}][{j}]");
        }
    }
    // The partial corner block [128..130, 128..200] uses the last scale.
    assert_eq!(w[129 * cols + 199], e4m3fn(codes[129 * cols + 199]) * 4.0);

    // With [64, 128] blocks the same weight needs a [3, 2] scale.
    assert!(matches!(
        ckpt.load_f32("v.weight", &[rows, cols]),
        Err(Error::TensorShape { ref name, ref expected, ref found })
            if name == "v.weight_scale_inv" && expected == &[2, 2] && found == &[3, 2]
    ));
    ckpt.set_fp8_block(64, 128);
    let v = ckpt
        .load_f32("v.weight", &[rows, cols])
        .expect("fp8 64x128");
    for i in 0..rows {
        for j in 0..cols {
            let want = e4m3fn(codes[i * cols + j]) * scale_64[(i / 64) * 2 + j / 128];
            assert_eq!(v[i * cols + j], want, "v[{i}][{j}]");
        }
    }
    // w's [2, 2] scale is now the wrong shape.
    assert!(matches!(
        ckpt.load_f32("w.weight", &[rows, cols]),
        Err(Error::TensorShape { ref name, ref expected, .. })
            if name == "w.weight_scale_inv" && expected == &[3, 2]
    ));
    ckpt.set_fp8_block(0, 128);
    assert!(matches!(
        ckpt.load_f32("w.weight", &[rows, cols]),
        Err(Error::Config(_))
    ));
}

#[test]
fn fp8_scale_may_be_bf16() {
    let dir = single(&[
        (
            "w.weight",
            Dtype::F8_E4M3,
            vec![2, 2],
            vec![0x38, 0x40, 0xc0, 0x01],
        ),
        (
            "w.weight_scale_inv",
            Dtype::BF16,
            vec![1, 1],
            bf16_bytes(&[0.5]),
        ),
    ]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    let w = ckpt.load_f32("w.weight", &[2, 2]).expect("fp8");
    assert_eq!(w, [0.5, 1.0, -1.0, 2f32.powi(-10)]);
}

#[test]
fn sharded_index_loads_from_every_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = "model-00001-of-00002.safetensors";
    let b = "model-00002-of-00002.safetensors";
    write(
        &dir.path().join(a),
        &[
            (
                "embed",
                Dtype::F32,
                vec![2, 2],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            ),
            ("layer.0", Dtype::BF16, vec![2], bf16_bytes(&[0.5, -0.5])),
        ],
    );
    write(
        &dir.path().join(b),
        &[("layer.1", Dtype::F16, vec![3], f16_bytes(&[1.0, 2.0, 3.0]))],
    );
    // A stray shard that the index does not name must not be opened.
    std::fs::write(dir.path().join("stray.safetensors"), b"garbage").expect("write");
    let index = serde_json::json!({
        "metadata": {"total_size": 26},
        "weight_map": {"embed": a, "layer.0": a, "layer.1": b},
    });
    std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).expect("write index");

    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert!(ckpt.contains("embed") && ckpt.contains("layer.1") && !ckpt.contains("layer.2"));
    assert_eq!(ckpt.shape("layer.1").expect("shape"), [3]);
    assert_eq!(
        ckpt.load_f32("embed", &[2, 2]).expect("embed"),
        [1.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(
        ckpt.load_f32("layer.0", &[2]).expect("layer.0"),
        [0.5, -0.5]
    );
    assert_eq!(
        ckpt.load_f32("layer.1", &[3]).expect("layer.1"),
        [1.0, 2.0, 3.0]
    );
    assert_eq!(ckpt.bytes_read(), 16 + 4 + 6);
}

#[test]
fn without_index_every_safetensors_file_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir.path().join("b.safetensors"),
        &[("x", Dtype::F32, vec![1], f32_bytes(&[2.0]))],
    );
    write(
        &dir.path().join("a.safetensors"),
        &[
            ("x", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("y", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ],
    );
    std::fs::write(dir.path().join("config.json"), "{}").expect("write");
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    // A name in two shards comes from the first in sorted order.
    assert_eq!(ckpt.load_f32("x", &[1]).expect("x"), [1.0]);
    assert_eq!(ckpt.load_f32("y", &[1]).expect("y"), [3.0]);
}

#[test]
fn missing_directory_and_empty_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = dir.path().join("nope");
    assert!(matches!(
        Checkpoint::open(&gone),
        Err(Error::MissingFile { ref path }) if path == &gone
    ));
    std::fs::write(dir.path().join("config.json"), "{}").expect("write");
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::MissingFile { ref path }) if path.ends_with("*.safetensors")
    ));
}

#[test]
fn index_naming_a_missing_file() {
    let dir = single(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    let index = serde_json::json!({
        "weight_map": {"a": "model.safetensors", "b": "model-00002.safetensors"},
    });
    std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).expect("write index");
    let err = Checkpoint::open(dir.path()).expect_err("missing shard");
    assert!(
        matches!(err, Error::MissingFile { ref path } if path == &dir.path().join("model-00002.safetensors")),
        "{err}"
    );
}

#[test]
fn index_naming_a_tensor_its_file_lacks() {
    let dir = single(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    let index =
        serde_json::json!({"weight_map": {"a": "model.safetensors", "b": "model.safetensors"}});
    std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).expect("write index");
    let err = Checkpoint::open(dir.path()).expect_err("tensor b absent");
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains(" b "));
}

#[test]
fn bad_index_json() {
    let dir = single(&[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    for text in ["{\"weight_map\": ", "{}", "{\"weight_map\": {\"a\": 3}}"] {
        std::fs::write(dir.path().join(INDEX_FILE), text).expect("write index");
        let err = Checkpoint::open(dir.path()).expect_err("bad index");
        assert!(
            matches!(err, Error::Safetensors { ref path, .. } if path.ends_with(INDEX_FILE)),
            "{err}"
        );
    }
}

#[test]
fn truncated_file_is_reported_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model-00001-of-00001.safetensors");
    write(&path, &[("a", Dtype::F32, vec![64], f32_bytes(&[1.0; 64]))]);
    let full = std::fs::read(&path).expect("read");
    for keep in [full.len() - 1, full.len() - 100, 20, 7, 0] {
        std::fs::write(&path, &full[..keep]).expect("truncate");
        let err = Checkpoint::open(dir.path()).expect_err("truncated");
        assert!(
            matches!(err, Error::Safetensors { path: ref p, .. } if p == &path),
            "{keep}: {err}"
        );
        assert!(
            err.to_string().contains("model-00001-of-00001.safetensors"),
            "{err}"
        );
    }
}

/// Writes a file with a hand-made header and `data_len` zero bytes of data.
fn raw(dir: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(dir.join("model.safetensors"), bytes).expect("write");
}

#[test]
fn hostile_headers_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("{not json", 0),
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551615]}}", 4),
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,4]}}", 4),
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12),
        ("{\"a\":{\"dtype\":\"NOPE\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
        ("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8),
    ];
    for (header, data_len) in cases {
        raw(dir.path(), header, data_len);
        let err = Checkpoint::open(dir.path()).expect_err(header);
        assert!(matches!(err, Error::Safetensors { .. }), "{header}: {err}");
    }
    // A header length far beyond the file.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
    let err = Checkpoint::open(dir.path()).expect_err("huge header length");
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    // An empty header is a valid, empty checkpoint.
    raw(dir.path(), "{}", 0);
    let ckpt = Checkpoint::open(dir.path()).expect("empty");
    assert!(!ckpt.contains("a"));
}

#[test]
fn missing_tensor_and_wrong_shape() {
    let dir = single(&[("a", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]))]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert!(matches!(
        ckpt.load_f32("b", &[2, 3]),
        Err(Error::MissingTensor { ref name }) if name == "b"
    ));
    assert!(matches!(ckpt.shape("b"), Err(Error::MissingTensor { .. })));
    assert!(matches!(
        ckpt.tensor_bytes("b"),
        Err(Error::MissingTensor { .. })
    ));
    let err = ckpt.load_f32("a", &[3, 2]).expect_err("wrong shape");
    match err {
        Error::TensorShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "a");
            assert_eq!(expected, [3, 2]);
            assert_eq!(found, [2, 3]);
        }
        other => panic!("expected TensorShape, got {other}"),
    }
    assert_eq!(ckpt.bytes_read(), 0);
}

#[test]
fn missing_scale_inv_is_named() {
    let dir = single(&[("w.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4])]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    let err = ckpt.load_f32("w.weight", &[2, 2]).expect_err("no scale");
    assert!(
        matches!(err, Error::MissingTensor { ref name } if name == "w.weight_scale_inv"),
        "{err}"
    );
    assert_eq!(ckpt.bytes_read(), 0);
}

#[test]
fn unsupported_dtypes() {
    let dir = single(&[
        ("ids", Dtype::I64, vec![2], vec![0; 16]),
        ("w3", Dtype::F8_E4M3, vec![1, 1, 2], vec![0x38; 2]),
        ("w.weight", Dtype::F8_E4M3, vec![1, 1], vec![0x38]),
        ("w.weight_scale_inv", Dtype::I32, vec![1, 1], vec![0; 4]),
    ]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert!(matches!(
        ckpt.load_f32("ids", &[2]),
        Err(Error::UnsupportedDtype { ref name, ref dtype }) if name == "ids" && dtype == "I64"
    ));
    assert!(matches!(
        ckpt.load_f32("w3", &[1, 1, 2]),
        Err(Error::UnsupportedDtype { ref name, .. }) if name == "w3"
    ));
    assert!(matches!(
        ckpt.load_f32("w.weight", &[1, 1]),
        Err(Error::UnsupportedDtype { ref name, .. }) if name == "w.weight_scale_inv"
    ));
    // Shape and size are known whatever the dtype.
    assert_eq!(ckpt.shape("ids").expect("shape"), [2]);
    assert_eq!(ckpt.tensor_bytes("ids").expect("bytes"), 16);
    assert_eq!(ckpt.bytes_read(), 0);
}

#[test]
fn bytes_read_counts_stored_bytes_including_scales() {
    let dir = single(&[
        ("a", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6])),
        ("b", Dtype::BF16, vec![5], bf16_bytes(&[0.0; 5])),
        (
            "w.weight",
            Dtype::F8_E4M3,
            vec![130, 200],
            vec![0x38; 26_000],
        ),
        (
            "w.weight_scale_inv",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0; 4]),
        ),
    ]);
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert_eq!(ckpt.bytes_read(), 0, "open reads no tensor data");
    assert_eq!(ckpt.tensor_bytes("w.weight").expect("size"), 26_000);
    ckpt.load_f32("a", &[2, 3]).expect("a");
    assert_eq!(ckpt.bytes_read(), 24);
    ckpt.load_f32("b", &[5]).expect("b");
    assert_eq!(ckpt.bytes_read(), 34);
    ckpt.load_f32("w.weight", &[130, 200]).expect("w");
    assert_eq!(ckpt.bytes_read(), 34 + 26_000 + 16);
    ckpt.load_f32("a", &[2, 3]).expect("a again");
    assert_eq!(ckpt.bytes_read(), 34 + 26_000 + 16 + 24);
}
