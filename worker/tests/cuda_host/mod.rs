//! Runs the CUDA backend's kernels (`src/backend/nvrtc.cu`) on the CPU: g++ compiles the
//! kernel source with `cuda_host.h`, which models CUDA's threads, and the tests call each
//! kernel through `launch_NAME`, with cuLaunchKernel's argument array.

use std::any::Any;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use moebius_worker::backend::grid::Grid;

/// The kernels compiled for the host, loaded.
pub struct HostKernels {
    library: libloading::Library,
    /// Kept until the library is unloaded.
    _dir: tempfile::TempDir,
}

/// One kernel's arguments, kept at fixed addresses for the launch.
#[derive(Default)]
pub struct Args {
    values: Vec<Box<dyn Any>>,
    pointers: Vec<*mut c_void>,
}

impl Args {
    /// Appends an argument: a scalar, or a pointer to host memory that the kernel reads or
    /// writes in place of device memory.
    pub fn arg<T: Copy + 'static>(mut self, value: T) -> Self {
        let boxed = Box::new(value);
        self.pointers.push(&*boxed as *const T as *mut c_void);
        self.values.push(boxed);
        self
    }
}

type Launch = unsafe extern "C" fn(*const u32, *const u32, *mut *mut c_void);

impl HostKernels {
    /// The kernels, compiled once per test process.
    pub fn get() -> &'static HostKernels {
        static KERNELS: OnceLock<HostKernels> = OnceLock::new();
        KERNELS.get_or_init(|| HostKernels::compile().unwrap_or_else(|e| panic!("{e}")))
    }

    fn compile() -> Result<Self, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let source_path = root.join("src/backend/nvrtc.cu");
        let source = std::fs::read_to_string(&source_path)
            .map_err(|e| format!("{}: {e}", source_path.display()))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut unit = format!(
            "#include \"{}\"\n#include \"{}\"\n",
            root.join("tests/cuda_host/cuda_host.h").display(),
            source_path.display()
        );
        for name in kernel_names(&source) {
            unit.push_str(&format!("MOEBIUS_EXPORT({name})\n"));
        }
        let unit_path = dir.path().join("kernels.cpp");
        std::fs::write(&unit_path, unit).map_err(|e| e.to_string())?;
        let library_path: PathBuf = dir.path().join("libkernels.so");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let output = Command::new(&compiler)
            // Kernels read bytes as wider words, as CUDA code may; the threads' fibers jump
            // between stacks, which fortified longjmp refuses.
            .args([
                "-std=c++20",
                "-O2",
                "-U_FORTIFY_SOURCE",
                "-fno-strict-aliasing",
                "-shared",
                "-fPIC",
                "-pthread",
            ])
            .arg("-o")
            .arg(&library_path)
            .arg(&unit_path)
            .output()
            .map_err(|e| format!("running {compiler} (a C++20 compiler, g++ 11 or later): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{compiler} could not compile the kernels for the host:\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        // SAFETY: the library is the one just built; its initialisers are the C++ runtime's.
        let library = unsafe { libloading::Library::new(&library_path) }
            .map_err(|e| format!("loading {}: {e}", library_path.display()))?;
        Ok(Self { library, _dir: dir })
    }

    /// Runs kernel `name` over `grid` with `args`, which must match the kernel's parameters in
    /// number, order and type (as for cuLaunchKernel); returns when every thread has finished.
    ///
    /// # Safety
    /// The pointers among `args` must point to host buffers as large as the kernel reads and
    /// writes.
    pub unsafe fn launch(&self, name: &str, grid: Grid, mut args: Args) {
        let symbol = format!("launch_{name}");
        // SAFETY: every launch_NAME has the signature of `Launch` (MOEBIUS_EXPORT).
        let launch: libloading::Symbol<Launch> = unsafe { self.library.get(symbol.as_bytes()) }
            .unwrap_or_else(|e| panic!("no kernel {name} in nvrtc.cu: {e}"));
        let blocks = [grid.blocks.0, grid.blocks.1, grid.blocks.2];
        let threads = [grid.threads.0, grid.threads.1, grid.threads.2];
        // SAFETY: the caller vouches for the arguments.
        unsafe {
            launch(
                blocks.as_ptr(),
                threads.as_ptr(),
                args.pointers.as_mut_ptr(),
            )
        };
    }
}

/// The names of the `extern "C" __global__` functions of a kernel source.
pub fn kernel_names(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    source
        .match_indices(MARK)
        .map(|(at, _)| {
            source[at + MARK.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}
