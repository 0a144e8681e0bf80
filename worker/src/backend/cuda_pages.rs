//! The CUDA backend's KV caches (feature `cuda`): pages of [`PAGE_ROWS`] rows in GPU memory,
//! shared by every sequence and layer of the backend, so that caches grow and shrink by pages
//! instead of copying whole buffers, and what one sequence lets go another takes.
//!
//! The pages come from arenas of [`ARENA_PAGES`] pages, allocated as the caches grow and kept
//! (the rank's KV cache budget bounds how many are ever needed, as vLLM's preallocated pool
//! does); a cache lists its pages' device addresses in order ([`CudaRows`]), and gives them
//! back when it shrinks or is dropped. `paged_rows` (`nvrtc.cu`) copies rows between a cache's
//! pages and a dense buffer: appending rows that span pages, and gathering a cache for
//! attention's cuBLAS products.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::cuda::Transfers;
use super::grid::{self, PAGE_ROWS};
use crate::error::{Error, Result};

/// Pages of one arena: 256 pages of 16 rows of DeepSeek-V3's 576 values are 9 MiB.
pub const ARENA_PAGES: usize = 256;

/// Every page of one GPU's caches, by row width.
pub struct PagePool {
    stream: Arc<CudaStream>,
    widths: Mutex<HashMap<usize, Pages>>,
    /// The backend's count, which appended rows add to.
    transfers: Arc<Transfers>,
}

/// The pages of one row width.
#[derive(Default)]
struct Pages {
    /// Kept for the pool's life: the pages point into them.
    arenas: Vec<CudaSlice<f32>>,
    free: Vec<CUdeviceptr>,
}

impl PagePool {
    pub fn new(stream: Arc<CudaStream>, transfers: Arc<Transfers>) -> Self {
        Self {
            stream,
            widths: Mutex::default(),
            transfers,
        }
    }

    /// `n` pages of rows `width` values wide, from the free ones or a new arena.
    fn take(&self, width: usize, n: usize) -> Result<Vec<CUdeviceptr>> {
        let mut widths = self.widths.lock().unwrap_or_else(PoisonError::into_inner);
        let pages = widths.entry(width).or_default();
        while pages.free.len() < n {
            let page_len = PAGE_ROWS * width;
            let arena: CudaSlice<f32> = self
                .stream
                .alloc_zeros(ARENA_PAGES * page_len)
                .map_err(|e| Error::Device(format!("allocating KV cache pages: {e}")))?;
            let base = arena.device_ptr(&self.stream).0;
            pages.free.extend(
                (0..ARENA_PAGES)
                    .rev()
                    .map(|i| base + (i * page_len * 4) as u64),
            );
            pages.arenas.push(arena);
        }
        let keep = pages.free.len() - n;
        Ok(pages.free.split_off(keep))
    }

    /// Takes back pages of rows `width` values wide. Work enqueued on the stream that still
    /// reads them runs before any later use, since every use is on the same stream.
    fn give_back(&self, width: usize, freed: impl Iterator<Item = CUdeviceptr>) {
        let mut widths = self.widths.lock().unwrap_or_else(PoisonError::into_inner);
        widths.entry(width).or_default().free.extend(freed);
    }
}

/// One layer's KV cache of one sequence: rows of `width` f32 values in pages of the pool.
pub struct CudaRows {
    /// Device addresses of the pages, in the order of the rows they hold.
    pages: Vec<CUdeviceptr>,
    /// Rows held.
    len: usize,
    width: usize,
    pool: Arc<PagePool>,
}

impl Drop for CudaRows {
    fn drop(&mut self) {
        self.pool.give_back(self.width, self.pages.drain(..));
    }
}

impl CudaRows {
    pub fn new(pool: Arc<PagePool>, width: usize) -> Self {
        Self {
            pages: Vec::new(),
            len: 0,
            width,
            pool,
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of the pages held.
    pub fn bytes(&self) -> usize {
        self.pages.len() * PAGE_ROWS * self.width * 4
    }

    /// Keeps the first `len` rows, and gives back the pages past them.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len.div_ceil(PAGE_ROWS);
        if keep < self.pages.len() {
            self.pool.give_back(self.width, self.pages.drain(keep..));
        }
    }

    /// Appends `data` (whole rows) on `stream`: into one page with one copy, or through a
    /// dense upload and `paged_rows` when the rows span pages.
    pub fn append(
        &mut self,
        stream: &Arc<CudaStream>,
        paged_rows: &CudaFunction,
        data: &[f32],
    ) -> Result<()> {
        let n = data.len() / self.width.max(1);
        if n == 0 {
            return Ok(());
        }
        match self.grow(n)? {
            Place::Page(at) => {
                // SAFETY: the page holds PAGE_ROWS rows of `width` f32 values, the n rows from
                // `at` among them; the copy is ordered on the stream, and returns once the
                // driver has taken `data` (pageable memory is staged).
                unsafe { cudarc::driver::result::memcpy_htod_async(at, data, stream.cu_stream()) }
                    .map_err(device)?;
            }
            Place::Pages(pages, offset) => {
                let flat = stream.clone_htod(data).map_err(device)?;
                let flat_p = flat.device_ptr(stream).0;
                let to = (flat_p, self.width);
                let table = copy_paged(stream, paged_rows, to, &pages, (offset, n), true)?;
                self.pool.transfers.launched();
                // No wait: cudarc frees the uploads in the stream's order, after the copy (or
                // waits for the stream first where the GPU has no stream-ordered allocator).
                drop((flat, table));
            }
        }
        self.pool.transfers.upload(data.len() * 4);
        self.len += n;
        Ok(())
    }

    /// Appends `n` whole rows that are already on the GPU, at `src` (`[n, width]` f32), on
    /// `stream`: one copy within a page, or `paged_rows` across pages, whose page table comes
    /// back to live until the copy has run. Nothing crosses to or from the host but the table.
    pub fn append_device(
        &mut self,
        stream: &Arc<CudaStream>,
        paged_rows: &CudaFunction,
        src: CUdeviceptr,
        n: usize,
    ) -> Result<Option<CudaSlice<CUdeviceptr>>> {
        if n == 0 {
            return Ok(None);
        }
        let table = match self.grow(n)? {
            Place::Page(at) => {
                // SAFETY: the page holds the n rows from `at`, and `src` holds n rows of
                // `width` values (the caller's word); the copy is ordered on the stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        at,
                        src,
                        n * self.width * 4,
                        stream.cu_stream(),
                    )
                }
                .map_err(device)?;
                None
            }
            Place::Pages(pages, offset) => {
                let from = (src, self.width);
                self.pool.transfers.launched();
                Some(copy_paged(
                    stream,
                    paged_rows,
                    from,
                    &pages,
                    (offset, n),
                    true,
                )?)
            }
        };
        self.len += n;
        Ok(table)
    }

    /// Takes the pages `n` more rows need, and says where they go: within one page from an
    /// address, or across the listed pages from a row of the first.
    fn grow(&mut self, n: usize) -> Result<Place> {
        let pages = (self.len + n).div_ceil(PAGE_ROWS);
        if pages > self.pages.len() {
            let more = self.pool.take(self.width, pages - self.pages.len())?;
            self.pages.extend(more);
        }
        let (first_page, last_page) = (self.len / PAGE_ROWS, (self.len + n - 1) / PAGE_ROWS);
        let offset = self.len % PAGE_ROWS;
        Ok(if first_page == last_page {
            Place::Page(self.pages[first_page] + (offset * self.width * 4) as u64)
        } else {
            Place::Pages(self.pages[first_page..=last_page].to_vec(), offset)
        })
    }

    /// The first `len` rows (at least one) in one dense buffer `[len, width]`, enqueued on
    /// `stream`; the page table it was read through comes along, to live until the copy ran.
    pub fn gather(
        &self,
        stream: &Arc<CudaStream>,
        paged_rows: &CudaFunction,
        len: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<CUdeviceptr>)> {
        if len == 0 || len > self.len {
            return Err(Error::Device(format!(
                "{len} rows asked of a cache of {}",
                self.len
            )));
        }
        let mut flat: CudaSlice<f32> = stream.alloc_zeros(len * self.width).map_err(device)?;
        let pages = &self.pages[..len.div_ceil(PAGE_ROWS)];
        let to = (flat.device_ptr_mut(stream).0, self.width);
        let table = copy_paged(stream, paged_rows, to, pages, (0, len), false)?;
        self.pool.transfers.launched();
        Ok((flat, table))
    }
}

/// The first `len` rows of each of `caches` (`(cache, len)`, every cache of one width, at
/// least one row each) in one dense buffer, by one `paged_rows` launch over all their pages:
/// cache `i`'s rows start at row `starts[i]`, a multiple of [`PAGE_ROWS`] (a cache's last page
/// comes whole, the rows past `len` with it). Returns the buffer, the page table it was read
/// through (both to live until the copy ran) and `starts`.
pub fn gather_all(
    stream: &Arc<CudaStream>,
    paged_rows: &CudaFunction,
    caches: &[(&CudaRows, usize)],
) -> Result<(CudaSlice<f32>, CudaSlice<CUdeviceptr>, Vec<usize>)> {
    let Some(&(first, _)) = caches.first() else {
        return Err(Error::Device("a gather of no caches".into()));
    };
    let width = first.width;
    let mut pages = Vec::new();
    let mut starts = Vec::with_capacity(caches.len());
    for &(cache, len) in caches {
        if len == 0 || len > cache.len || cache.width != width {
            return Err(Error::Device(format!(
                "{len} rows of {} asked of a cache of {} rows of {width}",
                cache.width, cache.len
            )));
        }
        starts.push(pages.len() * PAGE_ROWS);
        pages.extend_from_slice(&cache.pages[..len.div_ceil(PAGE_ROWS)]);
    }
    let rows = pages.len() * PAGE_ROWS;
    let mut flat: CudaSlice<f32> = stream.alloc_zeros(rows * width).map_err(device)?;
    let to = (flat.device_ptr_mut(stream).0, width);
    let table = copy_paged(stream, paged_rows, to, &pages, (0, rows), false)?;
    first.pool.transfers.launched();
    Ok((flat, table, starts))
}

/// Where appended rows go: within one page, from a device address; or across pages (their
/// addresses), from a row of the first.
enum Place {
    Page(CUdeviceptr),
    Pages(Vec<CUdeviceptr>, usize),
}

/// Enqueues `paged_rows` between the dense rows at `flat` (`rows` rows `width` values wide)
/// and `rows` rows from row `first` of the cache whose pages `pages` lists in order (into the
/// pages when `to_pages`); returns the page table it uploaded, which must live until the copy
/// has run.
fn copy_paged(
    stream: &Arc<CudaStream>,
    paged_rows: &CudaFunction,
    (flat, width): (CUdeviceptr, usize),
    pages: &[CUdeviceptr],
    (first, rows): (usize, usize),
    to_pages: bool,
) -> Result<CudaSlice<CUdeviceptr>> {
    let table = stream.clone_htod(pages).map_err(device)?;
    let dim = |v: usize| i32::try_from(v).map_err(|_| Error::Device(format!("{v} > i32::MAX")));
    let (first_i, rows_i, width_i) = (dim(first)?, dim(rows)?, dim(width)?);
    let (page_rows, to_pages) = (PAGE_ROWS as i32, i32::from(to_pages));
    let shape = grid::paged_rows(rows);
    let config = LaunchConfig {
        grid_dim: shape.blocks,
        block_dim: shape.threads,
        shared_mem_bytes: 0,
    };
    let mut launch = stream.launch_builder(paged_rows);
    launch.arg(&flat).arg(&table).arg(&first_i).arg(&rows_i);
    launch.arg(&width_i).arg(&page_rows).arg(&to_pages);
    // SAFETY: paged_rows(flat, pages, first, rows, width, page_rows, to_pages) touches the
    // rows × width values at `flat` and rows first .. first + rows of the pages `table` lists,
    // each page PAGE_ROWS rows of `width` values: the callers size both so.
    unsafe { launch.launch(config) }.map_err(device)?;
    Ok(table)
}

fn device(e: impl std::fmt::Display) -> Error {
    Error::Device(format!("KV cache pages: {e}"))
}
