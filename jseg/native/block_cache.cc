// Keeps XLA:CPU's large host blocks (an execution's temporaries, its outputs) for the next
// allocation of the same size instead of unmapping them, so a training step does not
// page-fault and zero its whole temporaries block again every call.
//
// jaxlib allocates them with posix_memalign and frees them with free. Blocks of
// `threshold` bytes and more are mapped afresh by glibc (jseg's fixed mmap threshold,
// runtime.fix_mmap_threshold), so every call first-touches them: ~59k minor faults per
// SegNet training step (256^2, batch 4). `jseg_block_cache_install` points the global offset
// table entries of those two functions in the named shared objects (jaxlib's) at the
// functions below; nothing else in the process is touched.
//
// Policy (memory never above what the same allocations would hold without the cache):
// - a freed tracked block is kept only when no other block of its size is live, at most
//   kMaxCached blocks;
// - an allocation takes a kept block of exactly its size (and alignment);
// - an allocation that finds none while a block of its size is still live waits up to
//   `wait_us` for that block's free (jaxlib frees an execution's temporaries just after its
//   outputs are ready, often after the caller has dispatched the next call); a size whose
//   wait once timed out is never waited for again (a caller keeping such blocks);
// - otherwise every kept block is freed first (another program runs now), then glibc's
//   posix_memalign serves it.
// `jseg_block_cache_release` frees every kept block, and keeps none freed until the next
// large allocation (before a compilation, an evaluation or a save).

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <atomic>

namespace {

using PosixMemalign = int (*)(void**, size_t, size_t);
using Free = void (*)(void*);

PosixMemalign real_posix_memalign = nullptr;
Free real_free = nullptr;
size_t threshold = 1 << 20;
long wait_us = 20000;
bool trace = false;  // JSEG_BLOCK_CACHE_TRACE=1: one stderr line per large event

void note(const char* what, size_t size) {
  if (!trace) return;
  char line[128];
  int n = snprintf(line, sizeof line, "block_cache %s %zu\n", what, size);
  if (n > 0) (void)!write(2, line, n);
}

constexpr int kSlots = 4096;  // live tracked blocks (open addressing; a few hundred at most)
constexpr int kMaxCached = 64;
constexpr int kNoWaitSizes = 64;
void* const kTombstone = reinterpret_cast<void*>(1);

void* live_ptr[kSlots];
size_t live_size[kSlots];
std::atomic<int> live_count{0};
void* kept_ptr[kMaxCached];
size_t kept_size[kMaxCached];
int kept = 0;
bool draining = false;  // after a release, until the next large allocation: keep nothing
size_t no_wait[kNoWaitSizes];
int no_wait_n = 0;
// hits, misses, waits that found their block, waits that timed out, blocks kept at once max
uint64_t stats[5];

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t freed = PTHREAD_COND_INITIALIZER;

unsigned slot_of(void* p) {
  return static_cast<unsigned>((reinterpret_cast<uintptr_t>(p) >> 12) * 2654435761u) % kSlots;
}

bool track(void* p, size_t size) {  // under mu
  unsigned i = slot_of(p);
  for (int n = 0; n < kSlots; n++, i = (i + 1) % kSlots) {
    if (live_ptr[i] == nullptr || live_ptr[i] == kTombstone || live_ptr[i] == p) {
      if (live_ptr[i] != p) live_count.fetch_add(1, std::memory_order_relaxed);
      live_ptr[i] = p;
      live_size[i] = size;
      return true;
    }
  }
  return false;  // table full: the block is simply not tracked
}

long find(void* p) {  // under mu
  unsigned i = slot_of(p);
  for (int n = 0; n < kSlots && live_ptr[i] != nullptr; n++, i = (i + 1) % kSlots)
    if (live_ptr[i] == p) return i;
  return -1;
}

bool size_live(size_t size) {  // under mu
  if (live_count.load(std::memory_order_relaxed) == 0) return false;
  for (int i = 0; i < kSlots; i++)
    if (live_ptr[i] != nullptr && live_ptr[i] != kTombstone && live_size[i] == size) return true;
  return false;
}

bool waits_for(size_t size) {  // under mu
  for (int i = 0; i < no_wait_n; i++)
    if (no_wait[i] == size) return false;
  return true;
}

void release_kept() {  // under mu
  for (int i = 0; i < kept; i++) note("release", kept_size[i]), real_free(kept_ptr[i]);
  kept = 0;
}

int take_kept(void** out, size_t align, size_t size) {  // under mu; 1 when served
  for (int i = 0; i < kept; i++) {
    if (kept_size[i] == size && reinterpret_cast<uintptr_t>(kept_ptr[i]) % align == 0) {
      *out = kept_ptr[i];
      kept--;
      kept_ptr[i] = kept_ptr[kept];
      kept_size[i] = kept_size[kept];
      track(*out, size);
      return 1;
    }
  }
  return 0;
}

int cached_posix_memalign(void** out, size_t align, size_t size) {
  if (size < threshold) return real_posix_memalign(out, align, size);
  pthread_mutex_lock(&mu);
  draining = false;
  bool served = take_kept(out, align, size);
  if (!served && wait_us > 0 && size_live(size) && waits_for(size)) {
    timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += wait_us / 1000000;
    until.tv_nsec += (wait_us % 1000000) * 1000;
    if (until.tv_nsec >= 1000000000) until.tv_sec++, until.tv_nsec -= 1000000000;
    while (!served && size_live(size) && pthread_cond_timedwait(&freed, &mu, &until) == 0)
      served = take_kept(out, align, size);
    served = served || take_kept(out, align, size);
    stats[served ? 2 : 3]++;
    note(served ? "wait-served" : "wait-timeout", size);
    if (!served && no_wait_n < kNoWaitSizes) no_wait[no_wait_n++] = size;
  }
  if (served) {
    note("hit", size);
    stats[0]++;
    pthread_mutex_unlock(&mu);
    return 0;
  }
  stats[1]++;
  note(size_live(size) ? "miss-twin-live" : "miss", size);
  release_kept();
  int r = real_posix_memalign(out, align, size);
  if (r == 0) track(*out, size);
  pthread_mutex_unlock(&mu);
  return r;
}

void cached_free(void* p) {
  if (p == nullptr) return;
  if (live_count.load(std::memory_order_relaxed) == 0 || malloc_usable_size(p) < threshold) {
    real_free(p);
    return;
  }
  pthread_mutex_lock(&mu);
  long i = find(p);
  if (i < 0) {
    pthread_mutex_unlock(&mu);
    real_free(p);
    return;
  }
  size_t size = live_size[i];
  live_ptr[i] = kTombstone;
  live_count.fetch_sub(1, std::memory_order_relaxed);
  // A block of at least its recorded size (else the address was reused untracked).
  if (!draining && malloc_usable_size(p) >= size && kept < kMaxCached && !size_live(size)) {
    kept_ptr[kept] = p;
    kept_size[kept] = size;
    kept++;
    if (static_cast<uint64_t>(kept) > stats[4]) stats[4] = kept;
    pthread_cond_broadcast(&freed);
    note("keep", size);
    pthread_mutex_unlock(&mu);
    return;
  }
  note("free", size);
  pthread_mutex_unlock(&mu);
  real_free(p);
}

struct Patch {
  const char* path_part;
  int patched;
};

ElfW(Addr) absolute(ElfW(Addr) v, ElfW(Addr) base) { return v < base ? v + base : v; }

bool set_slot(ElfW(Addr) addr, void* fn, ElfW(Addr) relro_lo, ElfW(Addr) relro_hi) {
  long page = sysconf(_SC_PAGESIZE);
  uintptr_t start = addr & ~static_cast<uintptr_t>(page - 1);
  if (mprotect(reinterpret_cast<void*>(start), page, PROT_READ | PROT_WRITE) != 0) return false;
  *reinterpret_cast<void**>(addr) = fn;
  if (addr >= relro_lo && addr < relro_hi) mprotect(reinterpret_cast<void*>(start), page, PROT_READ);
  return true;
}

int patch_object(dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<Patch*>(data);
  if (info->dlpi_name == nullptr || strstr(info->dlpi_name, want->path_part) == nullptr) return 0;
  ElfW(Addr) base = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  ElfW(Addr) relro_lo = 0, relro_hi = 0;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(base + ph.p_vaddr);
    if (ph.p_type == PT_GNU_RELRO) relro_lo = base + ph.p_vaddr, relro_hi = relro_lo + ph.p_memsz;
  }
  if (dyn == nullptr) return 0;
  const ElfW(Sym)* symtab = nullptr;
  const char* strtab = nullptr;
  const ElfW(Rela)* tables[2] = {nullptr, nullptr};
  size_t sizes[2] = {0, 0};
  bool rela = true;
  for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; d++) {
    switch (d->d_tag) {
      case DT_SYMTAB: symtab = reinterpret_cast<const ElfW(Sym)*>(absolute(d->d_un.d_ptr, base)); break;
      case DT_STRTAB: strtab = reinterpret_cast<const char*>(absolute(d->d_un.d_ptr, base)); break;
      case DT_JMPREL: tables[0] = reinterpret_cast<const ElfW(Rela)*>(absolute(d->d_un.d_ptr, base)); break;
      case DT_PLTRELSZ: sizes[0] = d->d_un.d_val; break;
      case DT_RELA: tables[1] = reinterpret_cast<const ElfW(Rela)*>(absolute(d->d_un.d_ptr, base)); break;
      case DT_RELASZ: sizes[1] = d->d_un.d_val; break;
      case DT_PLTREL: rela = d->d_un.d_val == DT_RELA; break;
    }
  }
  if (symtab == nullptr || strtab == nullptr || !rela) return 0;
#if defined(__x86_64__)
  const unsigned slot_types[2] = {R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT};
#elif defined(__aarch64__)
  const unsigned slot_types[2] = {R_AARCH64_JUMP_SLOT, R_AARCH64_GLOB_DAT};
#else
  return 0;
#endif
  for (int t = 0; t < 2; t++) {
    if (tables[t] == nullptr) continue;
    for (size_t k = 0; k < sizes[t] / sizeof(ElfW(Rela)); k++) {
      const ElfW(Rela)& r = tables[t][k];
      unsigned type = ELF64_R_TYPE(r.r_info);
      if (type != slot_types[0] && type != slot_types[1]) continue;
      const char* name = strtab + symtab[ELF64_R_SYM(r.r_info)].st_name;
      void* fn = nullptr;
      if (strcmp(name, "posix_memalign") == 0) fn = reinterpret_cast<void*>(&cached_posix_memalign);
      else if (strcmp(name, "free") == 0) fn = reinterpret_cast<void*>(&cached_free);
      if (fn != nullptr && set_slot(base + r.r_offset, fn, relro_lo, relro_hi)) want->patched++;
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// Points posix_memalign and free of every loaded shared object whose path contains
// `path_part` at the cache. Returns the number of table entries changed (0: none found).
// Call once per process (later calls only change the threshold and the wait).
int jseg_block_cache_install(const char* path_part, uint64_t min_bytes, int64_t max_wait_us) {
  pthread_mutex_lock(&mu);
  threshold = min_bytes;
  wait_us = max_wait_us;
  bool first = real_free == nullptr;
  const char* t = getenv("JSEG_BLOCK_CACHE_TRACE");
  trace = t != nullptr && t[0] == '1';
  if (first) {
    real_posix_memalign = reinterpret_cast<PosixMemalign>(dlsym(RTLD_DEFAULT, "posix_memalign"));
    real_free = reinterpret_cast<Free>(dlsym(RTLD_DEFAULT, "free"));
  }
  pthread_mutex_unlock(&mu);
  if (!first || real_posix_memalign == nullptr || real_free == nullptr) return 0;
  // A fork() while another thread holds the lock (a data loader's worker) must not leave
  // the child's copy locked.
  pthread_atfork([] { pthread_mutex_lock(&mu); }, [] { pthread_mutex_unlock(&mu); },
                 [] { pthread_mutex_init(&mu, nullptr); pthread_cond_init(&freed, nullptr); });
  Patch p{path_part, 0};
  dl_iterate_phdr(patch_object, &p);
  return p.patched;
}

// Frees every kept block, and every tracked block freed before the next large allocation
// (an execution's temporaries are freed just after its outputs are ready, so a release
// right after a call can come first).
void jseg_block_cache_release() {
  pthread_mutex_lock(&mu);
  release_kept();
  draining = true;
  pthread_mutex_unlock(&mu);
}

// hits, misses, waits served, waits timed out, most blocks kept at once, blocks kept now,
// bytes kept now.
void jseg_block_cache_stats(uint64_t* out) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < 5; i++) out[i] = stats[i];
  out[5] = kept;
  uint64_t bytes = 0;
  for (int i = 0; i < kept; i++) bytes += kept_size[i];
  out[6] = bytes;
  pthread_mutex_unlock(&mu);
}

}  // extern "C"
