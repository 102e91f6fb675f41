/* graphopt's QEMU TCG plugin: counts executed guest instructions (QEMU plugin API of QEMU 7.2).
 *
 * Build:  gcc -shared -fPIC -O2 -I<dir with qemu-plugin.h> insncount.c -o libinsncount.so
 * Use:    qemu-aarch64 -cpu cortex-a53 -plugin ./libinsncount.so,out=COUNT_FILE ./prog ...
 * At exit it writes "insns: N" to COUNT_FILE (without out=, through qemu_plugin_outs, which
 * needs `-d plugin`). Each translated block adds its instruction count inline when it runs.
 * The counter is shared by all guest threads without atomics: count single-threaded programs.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qemu-plugin.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t insns;
static char *out_path;

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
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
    } else {
      fprintf(stderr, "insncount: unknown argument '%s' (expected out=FILE)\n", argv[i]);
      return -1;
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
  qemu_plugin_register_atexit_cb(id, on_plugin_exit, NULL);
  return 0;
}
