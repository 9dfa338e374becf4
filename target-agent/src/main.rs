/// jemalloc instead of glibc malloc: chunk buffers are allocated on one thread and freed on
/// another, and glibc's per-thread arenas hold on to the freed memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One arena and no thread caches: the agents' allocations are few and large (64 KiB chunk
/// buffers), so caching them per thread and per arena only holds memory. Target peak RSS in the
/// 4 GiB initial sync: 415 MiB with glibc, 232-276 MiB with jemalloc's defaults, 106-116 MiB
/// with these, at the same speed. `_RJEM_MALLOC_CONF` in the environment overrides it.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:1,tcache:false\0";

fn main() -> std::process::ExitCode {
    target_agent::cli::main()
}
