//! Hugging Face checkpoint directories: memory-mapped safetensors shards, read lazily.
//!
//! [`Checkpoint::open`] maps every shard once and parses only the headers into an index of
//! tensor name → (shard, dtype, shape, byte range). [`Checkpoint::load_f32`] then reads one tensor
//! straight out of the map and converts it to `f32` (`dtype`), dequantising FP8 weights with
//! their block scales (`fp8`); [`Checkpoint::load_bf16_bits`] and [`Checkpoint::load_fp8`] keep
//! bf16 and FP8 weights as stored, for a backend that multiplies them so. Nothing is read that is not asked for, so a rank that holds a
//! few experts touches only their pages.

mod dtype;
mod fp8;
#[cfg(test)]
mod tests;

pub use fp8::{e4m3fn_nearest, e4m3fn_value, quantize_activations, Fp8Blocks};

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// The name of the shard index Hugging Face writes next to sharded checkpoints.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// The FP8 block size when config.json does not give one (DeepSeek-V3's).
const DEFAULT_FP8_BLOCK: (usize, usize) = (128, 128);

/// An opened Hugging Face checkpoint directory: the safetensors files memory-mapped, an index of
/// tensor name -> (file, dtype, shape). Opening reads only the headers.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
    fp8_block: (usize, usize),
    bytes_read: AtomicU64,
}

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives: its shard and the absolute byte range in that shard's map.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl Checkpoint {
    /// Opens `dir`: uses `model.safetensors.index.json` (`weight_map`: name -> file) when present,
    /// otherwise every `*.safetensors` file in the directory (sorted). Errors: Error::MissingFile
    /// when the directory or the files named by the index are missing or there is no safetensors
    /// file at all; Error::Safetensors for a truncated/corrupt file (header says more bytes than
    /// the file has, bad JSON header, ...) naming the file.
    pub fn open(dir: &Path) -> Result<Self> {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::MissingFile { path: dir.into() }),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::MissingFile { path: dir.into() })
            }
            Err(source) => return Err(io_error(dir, source)),
        }
        let index_path = dir.join(INDEX_FILE);
        let weight_map = if index_path.is_file() {
            Some(read_index(&index_path)?)
        } else {
            None
        };
        let file_names = match &weight_map {
            Some(map) => {
                let mut names: Vec<&str> = map.values().map(String::as_str).collect();
                names.sort_unstable();
                names.dedup();
                names.into_iter().map(|n| dir.join(n)).collect()
            }
            None => list_safetensors(dir)?,
        };
        if file_names.is_empty() {
            return Err(Error::MissingFile {
                path: dir.join("*.safetensors"),
            });
        }

        let mut shards = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (shard, path) in file_names.into_iter().enumerate() {
            let (map, entries) = open_shard(&path, shard)?;
            for (name, entry) in entries {
                if let Some(map) = &weight_map {
                    // The index decides which shard holds a name that several shards list.
                    if map.get(&name).is_some_and(|f| dir.join(f) != path) {
                        continue;
                    }
                }
                if tensors.contains_key(&name) {
                    tracing::warn!(
                        tensor = %name,
                        file = %path.display(),
                        "tensor is in more than one shard; using the first (in sorted order)"
                    );
                    continue;
                }
                tensors.insert(name, entry);
            }
            shards.push(Shard { path, map });
        }
        if let Some(map) = &weight_map {
            for (name, file) in map {
                if !tensors.contains_key(name) {
                    return Err(Error::Safetensors {
                        path: dir.join(file),
                        message: format!(
                            "{INDEX_FILE} places tensor {name} in this file, but its header does not list it"
                        ),
                    });
                }
            }
        }

        Ok(Checkpoint {
            dir: dir.into(),
            shards,
            tensors,
            fp8_block: DEFAULT_FP8_BLOCK,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Sets the FP8 block size (from config.json's quantization_config.weight_block_size), default [128, 128].
    ///
    /// A zero side is accepted here and reported as Error::Config by the first FP8 load.
    pub fn set_fp8_block(&mut self, rows: usize, cols: usize) {
        self.fp8_block = (rows, cols);
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape of a tensor as stored, or Error::MissingTensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// Stored size of a tensor in bytes (its scale tensor, if any, not included), or
    /// Error::MissingTensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<u64> {
        let entry = self.entry(name)?;
        Ok(stored_len(entry))
    }

    /// Reads tensor `name` as f32, checking its shape equals `expected` (Error::TensorShape otherwise,
    /// Error::MissingTensor when absent). Converts F32, BF16, F16, and F8_E4M3 (fn variant: e4m3fn,
    /// max 448, no infinities, 0x7f/0xff are NaN). An F8_E4M3 weight is dequantised with the F32 tensor
    /// `<name>_scale_inv` (so "x.weight" -> "x.weight_scale_inv"), shape [ceil(rows/br), ceil(cols/bc)]:
    /// `w[i][j] = fp8(w)[i][j] * scale_inv[i/br][j/bc]`; a missing or wrongly-shaped scale tensor is an
    /// error naming it. Other dtypes -> Error::UnsupportedDtype.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry_of_shape(name, expected)?;
        if entry.dtype == Dtype::F8_E4M3 {
            return Ok(self.fp8_blocks(name, entry)?.dequantize());
        }
        let values = self.convert_float(name, entry)?;
        self.count(entry);
        Ok(values)
    }

    /// Reads tensor `name` as raw bf16 bits when it is stored as BF16 (shape checked as in
    /// [`Checkpoint::load_f32`]), so a backend can keep it at two bytes a value; `None` for any
    /// other dtype.
    pub fn load_bf16_bits(&self, name: &str, expected: &[usize]) -> Result<Option<Vec<u16>>> {
        let entry = self.entry_of_shape(name, expected)?;
        if entry.dtype != Dtype::BF16 {
            return Ok(None);
        }
        let bits = self
            .data(entry)?
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        self.count(entry);
        Ok(Some(bits))
    }

    /// Reads tensor `name` as its FP8 codes and block scales when it is stored as F8_E4M3 (shape
    /// and scales checked as in [`Checkpoint::load_f32`]), so a backend can keep it at one byte
    /// a value; `None` for any other dtype.
    pub fn load_fp8(&self, name: &str, expected: &[usize]) -> Result<Option<Fp8Blocks>> {
        let entry = self.entry_of_shape(name, expected)?;
        if entry.dtype != Dtype::F8_E4M3 {
            return Ok(None);
        }
        self.fp8_blocks(name, entry).map(Some)
    }

    /// Total bytes of tensor data read (as stored on disk, including scale tensors) since open;
    /// lets a rank report how many weight bytes it loaded.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The entry of `name`, which must have shape `expected`.
    fn entry_of_shape(&self, name: &str, expected: &[usize]) -> Result<&Entry> {
        let entry = self.entry(name)?;
        if entry.shape != expected {
            return Err(Error::TensorShape {
                name: name.into(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })
    }

    /// The stored bytes of `entry`, with a read-ahead hint to the kernel.
    fn data(&self, entry: &Entry) -> Result<&[u8]> {
        let shard = self.shards.get(entry.shard);
        let bytes = shard.and_then(|s| s.map.get(entry.start..entry.end));
        match (shard, bytes) {
            (Some(shard), Some(bytes)) => {
                // Only a hint, so a failure changes nothing but speed.
                #[cfg(unix)]
                let _ = shard.map.advise_range(
                    memmap2::Advice::WillNeed,
                    entry.start,
                    entry.end - entry.start,
                );
                Ok(bytes)
            }
            // Ruled out by open(), which checked every range against its map.
            _ => Err(Error::Safetensors {
                path: shard.map_or_else(|| self.dir.clone(), |s| s.path.clone()),
                message: format!(
                    "byte range {}..{} is outside the file",
                    entry.start, entry.end
                ),
            }),
        }
    }

    /// Reads a tensor stored as F32, BF16 or F16.
    fn convert_float(&self, name: &str, entry: &Entry) -> Result<Vec<f32>> {
        let convert = match entry.dtype {
            Dtype::F32 => dtype::f32_from_le,
            Dtype::BF16 => dtype::bf16_from_le,
            Dtype::F16 => dtype::f16_from_le,
            other => {
                return Err(Error::UnsupportedDtype {
                    name: name.into(),
                    dtype: other.to_string(),
                })
            }
        };
        Ok(convert(self.data(entry)?))
    }

    fn fp8_blocks(&self, name: &str, entry: &Entry) -> Result<Fp8Blocks> {
        let &[rows, cols] = entry.shape.as_slice() else {
            return Err(Error::UnsupportedDtype {
                name: name.into(),
                dtype: format!(
                    "F8_E4M3 of shape {:?} (only 2-D FP8 weights with block scales can be loaded)",
                    entry.shape
                ),
            });
        };
        let (br, bc) = self.fp8_block;
        let Some(scale_shape) = fp8::scale_shape(rows, cols, self.fp8_block) else {
            return Err(Error::Config(format!(
                "quantization_config.weight_block_size must be positive, got [{br}, {bc}]"
            )));
        };
        let scale_name = format!("{name}_scale_inv");
        let scale_entry = self.entry(&scale_name)?;
        if scale_entry.shape != scale_shape {
            return Err(Error::TensorShape {
                name: scale_name,
                expected: scale_shape.to_vec(),
                found: scale_entry.shape.clone(),
            });
        }
        let scales = self.convert_float(&scale_name, scale_entry)?;
        let codes = self.data(entry)?.to_vec();
        self.count(entry);
        self.count(scale_entry);
        Ok(Fp8Blocks {
            rows,
            cols,
            codes,
            scales,
            block: self.fp8_block,
        })
    }

    fn count(&self, entry: &Entry) {
        self.bytes_read
            .fetch_add(stored_len(entry), Ordering::Relaxed);
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .field("fp8_block", &self.fp8_block)
            .field("bytes_read", &self.bytes_read())
            .finish()
    }
}

fn stored_len(entry: &Entry) -> u64 {
    // usize -> u64 is lossless on every target Rust supports with memory maps this large.
    (entry.end - entry.start) as u64
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        source,
    }
}

/// Reads the `weight_map` (tensor name -> file name) of a shard index.
fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let bad = |message: String| Error::Safetensors {
        path: path.into(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON in the index: {e}")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("the index has no \"weight_map\" object".into()));
    };
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(file) => Ok((name.clone(), file.to_owned())),
            None => Err(bad(format!(
                "weight_map entry {name} is not a file name: {file}"
            ))),
        })
        .collect()
}

/// Every `*.safetensors` file in `dir`, sorted.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let path = item.map_err(|e| io_error(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Maps one shard and parses its header into entries pointing into the map.
fn open_shard(path: &Path, shard: usize) -> Result<(Mmap, Vec<(String, Entry)>)> {
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::MissingFile { path: path.into() },
        _ => io_error(path, e),
    })?;
    let bad = |message: String| Error::Safetensors {
        path: path.into(),
        message,
    };
    let file_len = file.metadata().map_err(|e| io_error(path, e))?.len();
    if file_len < 8 {
        return Err(bad(format!(
            "the file has {file_len} bytes, fewer than the 8-byte header length"
        )));
    }
    // SAFETY: the map is read-only and lives as long as the Checkpoint. We assume nobody
    // modifies or truncates the checkpoint files while they are open (they are read-only model
    // weights): a write would change the tensors under us, and a truncation would make reads of
    // the lost pages fault (SIGBUS). Everything we read is bounds-checked against the map's
    // length, which is the file's length at open time.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
    let entries = parse_header(&map, shard).map_err(bad)?;
    Ok((map, entries))
}

/// For the fuzz targets: `file` parsed as one shard; whether it was accepted.
#[doc(hidden)]
pub fn parse_untrusted_header(file: &[u8]) -> bool {
    parse_header(file, 0).is_ok()
}

/// The tensors a safetensors file's header lists, each checked to lie inside `file` and to
/// hold as many bytes as its dtype and shape say.
fn parse_header(file: &[u8], shard: usize) -> std::result::Result<Vec<(String, Entry)>, String> {
    let (header_len, metadata) = SafeTensors::read_metadata(file)
        .map_err(|e| format!("{e} (the file has {} bytes)", file.len()))?;
    let data_start = header_len
        .checked_add(8)
        .ok_or_else(|| "header length overflows".to_string())?;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let (from, to) = info.data_offsets;
        let range = data_start
            .checked_add(from)
            .zip(data_start.checked_add(to))
            .filter(|&(start, end)| start <= end && end <= file.len());
        let Some((start, end)) = range else {
            return Err(format!(
                "tensor {name} has data offsets [{from}, {to}] beyond the end of the file"
            ));
        };
        let entry = Entry {
            shard,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start,
            end,
        };
        entries.push((name, entry));
    }
    Ok(entries)
}
