/* graphopt's QEMU TCG plugin: counts executed guest instructions (QEMU plugin API of QEMU 7.2).
 *
 * Build:  gcc -shared -fPIC -O2 -I<dir with qemu-plugin.h> insncount.c -o libinsncount.so
 * Use:    qemu-aarch64 -cpu cortex-a53 -plugin ./libinsncount.so,out=COUNT_FILE ./prog ...
 * At exit it writes "insns: N" to COUNT_FILE (without out=, through qemu_plugin_outs, which
 * needs `-d plugin`). Each translated block adds its instruction count inline when it runs.
 * With marks=FILE (hex guest addresses, one a line, e.g. function entries), every time a
 * translated block starting at one of them runs, the running count is recorded; the count file
 * then also holds one "mark ADDRESS COUNT" line per hit, in execution order (at most MAX_HITS).
 * The counter is shared by all guest threads without atomics: count single-threaded programs.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qemu-plugin.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAX_HITS (1u << 20)

static uint64_t insns;
static char *out_path;
static uint64_t *marks; /* sorted */
static size_t n_marks;
static uint64_t (*hits)[2]; /* (mark index, count) */
static size_t n_hits;

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static int read_marks(const char *path) {
  FILE *f = fopen(path, "r");
  size_t cap = 64;
  unsigned long long a;
  if (!f) return -1;
  marks = malloc(cap * sizeof *marks);
  while (marks && fscanf(f, "%llx", &a) == 1) {
    if (n_marks == cap) marks = realloc(marks, (cap *= 2) * sizeof *marks);
    if (marks) marks[n_marks++] = (uint64_t)a;
  }
  fclose(f);
  if (!marks) return -1;
  qsort(marks, n_marks, sizeof *marks, cmp_u64);
  hits = malloc(MAX_HITS * sizeof *hits);
  return hits ? 0 : -1;
}

static void on_mark(unsigned int vcpu_index, void *udata) {
  (void)vcpu_index;
  if (n_hits < MAX_HITS) {
    hits[n_hits][0] = (uint64_t)(uintptr_t)udata;
    hits[n_hits][1] = insns;
    ++n_hits;
  }
}

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  if (n_marks) {
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    uint64_t *m = bsearch(&pc, marks, n_marks, sizeof *marks, cmp_u64);
    if (m) /* before the block's own count is added: a hit counts what ran before the block */
      qemu_plugin_register_vcpu_tb_exec_cb(tb, on_mark, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)(m - marks));
  }
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
}

static void on_plugin_exit(qemu_plugin_id_t id, void *data) {
  (void)id;
  (void)data;
  char line[64];
  snprintf(line, sizeof line, "insns: %" PRIu64 "\n", insns);
  FILE *f = out_path ? fopen(out_path, "w") : NULL;
  if (f) {
    fputs(line, f);
    for (size_t i = 0; i < n_hits; ++i)
      fprintf(f, "mark %" PRIx64 " %" PRIu64 "\n", marks[hits[i][0]], hits[i][1]);
    fclose(f);
  } else {
    qemu_plugin_outs(line);
  }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; ++i) {
    if (strncmp(argv[i], "out=", 4) == 0) {
      out_path = strdup(argv[i] + 4);
    } else if (strncmp(argv[i], "marks=", 6) == 0) {
      if (read_marks(argv[i] + 6) != 0) {
        fprintf(stderr, "insncount: cannot read marks file '%s'\n", argv[i] + 6);
        return -1;
      }
    } else {
      fprintf(stderr, "insncount: unknown argument '%s' (expected out=FILE or marks=FILE)\n", argv[i]);
      return -1;
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
  qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
  return 0;
}
