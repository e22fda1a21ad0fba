/* An executable with its own malloc family (like a program with a vendored allocator): the dynamic
 * loader binds malloc to it, so an LD_PRELOADed shim never sees these allocations. Also built with
 * -static for the "static executable" check. */
#include <stddef.h>

static char heap[1 << 20] __attribute__((aligned(16)));
static size_t used;

void *malloc(size_t n)
{
    if (used + n > sizeof heap) return NULL;
    void *p = heap + used;
    used += (n + 15) & ~(size_t)15;
    return p;
}
void free(void *p) { (void)p; }
void *calloc(size_t a, size_t b) { return malloc(a * b); }
void *realloc(void *p, size_t n) { (void)p; return malloc(n); }

int main(void) { return malloc(10) == NULL; }
