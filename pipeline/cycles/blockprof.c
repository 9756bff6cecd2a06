/* A QEMU TCG plugin (plugin API version 1, QEMU 7.2) that profiles translated blocks for cycle estimation.

   For every translated block it writes the block's guest address and instruction bytes, and counts its
   executions with an inline add (no helper call, so the guest runs at near full speed). The guest marks
   phases: by running the code at `mark=ADDR` (firmware: a no-op function whose address the host reads from
   the ELF), or by the syscall `lseek(-1, MAGIC + k, 0)` (Linux guests under qemu-user; the call fails with
   EBADF and has no effect). At every mark the plugin writes each block's executions since the previous mark,
   so the host can sum the work of one inference, or of one operator, and nothing else.

   Under qemu-user every guest thread is a vCPU of its own. A runtime may keep a thread that spins without a
   syscall (ONNX Runtime does), whose instructions would land in whatever segment is open for as long as the host
   lets it run; so with `vcpu=N` only vCPU N is counted (the first thread is 0), by a callback per block instead
   of the inline add.

   Output (`out=PATH`), one record a line:
     B id vaddr n_insns size,size,... hexbytes     a block as translated
     M                                             a mark: the segment before it ends here
     C id count                                    executions of block `id` in the segment that ends next
   Written by hand because QEMU's own contrib plugins (hotblocks, howvec) are not packaged by Debian and none
   of them records instruction bytes per block with phase marks. */
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                                              uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                                              uint64_t a7, uint64_t a8);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define CHUNK 4096
typedef struct {
  uint64_t count; /* the inline add's target: its address must never move */
  uint64_t last;  /* count at the previous mark */
} Block;

static Block *chunks[1 << 16]; /* up to 268 M translations, allocated a chunk at a time */
static uint32_t n_blocks;
static FILE *out;
static uint64_t mark_addr = UINT64_MAX, syscall_no = UINT64_MAX, magic = UINT64_MAX, only_vcpu = UINT64_MAX;
static uint64_t marks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static Block *block_at(uint32_t i) { return &chunks[i / CHUNK][i % CHUNK]; }

/* Write every block's executions since the previous mark, then the mark itself. */
static void flush_segment(int with_mark) {
  pthread_mutex_lock(&lock);
  for (uint32_t i = 0; i < n_blocks; ++i) {
    Block *b = block_at(i);
    uint64_t now = __atomic_load_n(&b->count, __ATOMIC_RELAXED);
    if (now != b->last) {
      fprintf(out, "C %" PRIu32 " %" PRIu64 "\n", i, now - b->last);
      b->last = now;
    }
  }
  if (with_mark) {
    fputs("M\n", out);
    ++marks;
  }
  pthread_mutex_unlock(&lock);
}

static void on_mark(unsigned int vcpu, void *udata) { flush_segment(1); }

static void on_exec(unsigned int vcpu, void *udata) {
  if (vcpu == only_vcpu) ++((Block *)udata)->count;
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                       uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8) {
  if ((uint64_t)num == syscall_no && (int32_t)a1 == -1 && a2 == magic && (only_vcpu == UINT64_MAX || vcpu == only_vcpu))
    flush_segment(1);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  size_t n = qemu_plugin_tb_n_insns(tb);
  uint64_t vaddr = qemu_plugin_tb_vaddr(tb);
  pthread_mutex_lock(&lock);
  uint32_t index = n_blocks;
  if (index % CHUNK == 0) {
    if (index / CHUNK >= sizeof(chunks) / sizeof(chunks[0])) {
      pthread_mutex_unlock(&lock);
      return; /* beyond 268 M translations the rest go uncounted (never seen in practice) */
    }
    chunks[index / CHUNK] = calloc(CHUNK, sizeof(Block));
  }
  ++n_blocks;
  fprintf(out, "B %" PRIu32 " %" PRIx64 " %zu ", index, vaddr, n);
  for (size_t i = 0; i < n; ++i) fprintf(out, i ? ",%zu" : "%zu", qemu_plugin_insn_size(qemu_plugin_tb_get_insn(tb, i)));
  fputc(' ', out);
  for (size_t i = 0; i < n; ++i) {
    const struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    const uint8_t *bytes = qemu_plugin_insn_data(insn);
    for (size_t k = 0; k < qemu_plugin_insn_size(insn); ++k) fprintf(out, "%02x", bytes[k]);
  }
  fputc('\n', out);
  pthread_mutex_unlock(&lock);
  /* Thumb code is entered at odd addresses; the block's address is even */
  if (mark_addr != UINT64_MAX && vaddr == (mark_addr & ~(uint64_t)1))
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_mark, QEMU_PLUGIN_CB_NO_REGS, NULL);
  if (only_vcpu == UINT64_MAX)
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &block_at(index)->count, 1);
  else
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, block_at(index));
}

static void at_exit(qemu_plugin_id_t id, void *udata) {
  flush_segment(0);
  fprintf(out, "E %" PRIu64 "\n", marks);
  fclose(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                                              char **argv) {
  const char *path = NULL;
  for (int i = 0; i < argc; ++i) {
    if (!strncmp(argv[i], "out=", 4)) path = argv[i] + 4;
    else if (!strncmp(argv[i], "mark=", 5)) mark_addr = strtoull(argv[i] + 5, NULL, 0);
    else if (!strncmp(argv[i], "syscall=", 8)) syscall_no = strtoull(argv[i] + 8, NULL, 0);
    else if (!strncmp(argv[i], "magic=", 6)) magic = strtoull(argv[i] + 6, NULL, 0);
    else if (!strncmp(argv[i], "vcpu=", 5)) only_vcpu = strtoull(argv[i] + 5, NULL, 0);
    else {
      fprintf(stderr, "blockprof: unknown argument %s; known: out=, mark=, syscall=, magic=, vcpu=\n", argv[i]);
      return 1;
    }
  }
  if (!path || !(out = fopen(path, "w"))) {
    fprintf(stderr, "blockprof: needs out=PATH (a writable file)\n");
    return 1;
  }
  setvbuf(out, NULL, _IOFBF, 1 << 20);
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  if (syscall_no != UINT64_MAX) qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
  qemu_plugin_register_atexit_cb(id, at_exit, NULL);
  return 0;
}
