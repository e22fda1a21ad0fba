// C++ test target for tests/test_shim.py: operator new / new[] and their nothrow forms, called N
// times; prints the 1-based indices that failed (bad_alloc caught, or NULL from nothrow).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

static void *volatile sink; // keeps the compiler from eliding new/delete pairs

int main(int argc, char **argv)
{
    if (argc != 4) { std::fprintf(stderr, "usage: shimcxx new|new[]|nothrow|nothrow[]|string|hold N SIZE\n"); return 2; }
    std::string mode = argv[1];
    long n = std::atol(argv[2]);
    std::size_t size = std::strtoul(argv[3], nullptr, 0);
    std::vector<long> fails;
    if (mode == "hold") { // n blocks of size bytes held until stdin says go, then freed
        std::vector<char *> blocks;
        for (long i = 0; i < n; i++) blocks.push_back(new char[size]);
        std::printf("holding\n");
        std::fflush(stdout);
        char buf[8];
        if (!std::fgets(buf, sizeof buf, stdin)) return 1;
        for (char *b : blocks) delete[] b;
        blocks.clear();
        blocks.shrink_to_fit();
        std::printf("freed\n");
        std::fflush(stdout);
        if (!std::fgets(buf, sizeof buf, stdin)) return 1;
        return 0;
    }
    fails.reserve(n);
    for (long i = 1; i <= n; i++) {
        try {
            if (mode == "new") { sink = ::operator new(size); ::operator delete(sink); }
            else if (mode == "new[]") { sink = ::operator new[](size); ::operator delete[](sink); }
            else if (mode == "nothrow") {
                sink = ::operator new(size, std::nothrow);
                if (!sink) fails.push_back(i);
                ::operator delete(sink);
            } else if (mode == "nothrow[]") {
                sink = ::operator new[](size, std::nothrow);
                if (!sink) fails.push_back(i);
                ::operator delete[](sink);
            } else if (mode == "string") { // the library's allocator path, inlined into this executable
                std::string s(size, 'x');
                sink = &s[0];
            } else { std::fprintf(stderr, "unknown mode\n"); return 2; }
        } catch (const std::bad_alloc &) {
            fails.push_back(i);
        }
    }
    std::printf("fails");
    for (long f : fails) std::printf(" %ld", f);
    std::printf("\n");
    return 0;
}
