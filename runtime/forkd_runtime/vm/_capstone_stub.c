/* A stand-in for libcapstone (the disassembler QEMU links) in forkd's QEMU processes.
 *
 * Why: QEMU only disassembles for debug logs (-d in_asm/out_asm) and the
 * monitor's x/i, which forkd never asks for, yet loading the real library
 * costs every QEMU process ~1.3 MiB of private memory: capstone's tables are
 * full of pointers, so the dynamic linker writes them (relocations) in each
 * process. With hundreds of children per host that is most of a child's
 * budget. Every function here reports failure, and QEMU's callers then fall
 * back to their own disassembler or print nothing.
 *
 * Only the entry points QEMU imports (checked by the runtime before it uses
 * this library: vm/_qemu_libs.py). Freestanding: no libc needed.
 */

typedef unsigned long size_t;

#define CS_ERR_MEM 1
#define CS_ERR_OPTION 7

#define EXPORT __attribute__((visibility("default")))

EXPORT int cs_open(int arch, int mode, size_t *handle) {
    (void)arch, (void)mode;
    if (handle) *handle = 0;
    return CS_ERR_MEM;
}

EXPORT int cs_close(size_t *handle) {
    if (handle) *handle = 0;
    return 0;
}

EXPORT int cs_option(size_t handle, int type, size_t value) {
    (void)handle, (void)type, (void)value;
    return CS_ERR_OPTION;
}

EXPORT void *cs_malloc(size_t handle) {
    (void)handle;
    return 0;
}

EXPORT _Bool cs_disasm_iter(size_t handle, const unsigned char **code, size_t *size, unsigned long *address,
                            void *insn) {
    (void)handle, (void)code, (void)size, (void)address, (void)insn;
    return 0;
}

EXPORT size_t cs_disasm(size_t handle, const unsigned char *code, size_t size, unsigned long address,
                        size_t count, void **insn) {
    (void)handle, (void)code, (void)size, (void)address, (void)count;
    if (insn) *insn = 0;
    return 0;
}

EXPORT void cs_free(void *insn, size_t count) { (void)insn, (void)count; }

EXPORT int cs_errno(size_t handle) {
    (void)handle;
    return CS_ERR_MEM;
}

EXPORT const char *cs_strerror(int code) {
    (void)code;
    return "capstone is not loaded in this QEMU process (forkd)";
}

EXPORT unsigned int cs_version(int *major, int *minor) {
    if (major) *major = 0;
    if (minor) *minor = 0;
    return 0;
}
