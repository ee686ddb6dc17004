/* fk_had_tables.h: the sign patterns of the Paley Hadamard matrices H_m (src/quant/hadamard.rs) for the
 * online Hadamard kernel (kernels/quant/hadamard.cu). Generated; the unit test
 * quant::hadamard::tests::kernel_tables_are_current regenerates this text and compares it.
 * fk_had_col<M>(c) has bit a set when H_M[a][c] = -1: output block c of x.H is the sum over a of
 * +-(block a). With c a compile-time constant (an unrolled loop) every sign folds into an FADD/FSUB. */
#ifndef FK_HAD_TABLES_H
#define FK_HAD_TABLES_H

#include <stdint.h>

template <int M>
__device__ __forceinline__ uint64_t fk_had_col(int c);

template <>
__device__ __forceinline__ uint64_t fk_had_col<12>(int c) {
    constexpr uint64_t t[12] = {
        0x0000000000000ffeull, 0x0000000000000474ull, 0x00000000000008e8ull, 0x00000000000001d2ull,
        0x00000000000003a4ull, 0x0000000000000748ull, 0x0000000000000e90ull, 0x0000000000000d22ull,
        0x0000000000000a46ull, 0x000000000000048eull, 0x000000000000091cull, 0x000000000000023aull,
    };
    return t[c];
}

template <>
__device__ __forceinline__ uint64_t fk_had_col<20>(int c) {
    constexpr uint64_t t[20] = {
        0x00000000000ffffeull, 0x00000000000615e4ull, 0x00000000000c2bc8ull, 0x0000000000085792ull,
        0x000000000000af26ull, 0x0000000000015e4cull, 0x000000000002bc98ull, 0x0000000000057930ull,
        0x00000000000af260ull, 0x000000000005e4c2ull, 0x00000000000bc984ull, 0x000000000007930aull,
        0x00000000000f2614ull, 0x00000000000e4c2aull, 0x00000000000c9856ull, 0x00000000000930aeull,
        0x000000000002615eull, 0x000000000004c2bcull, 0x0000000000098578ull, 0x0000000000030af2ull,
    };
    return t[c];
}

template <>
__device__ __forceinline__ uint64_t fk_had_col<28>(int c) {
    constexpr uint64_t t[28] = {
        0x0000000000000002ull, 0x000000000aaaaaabull, 0x00000000030ff0c8ull, 0x0000000009a55a6eull,
        0x000000000c3fc320ull, 0x00000000069569baull, 0x0000000000ff0c8cull, 0x000000000a55a6e6ull,
        0x0000000003fc3230ull, 0x0000000009569b9aull, 0x000000000ff0c8c0ull, 0x00000000055a6e6aull,
        0x000000000fc3230cull, 0x000000000569b9a6ull, 0x000000000f0c8c3cull, 0x0000000005a6e696ull,
        0x000000000c3230fcull, 0x00000000069b9a56ull, 0x0000000000c8c3fcull, 0x000000000a6e6956ull,
        0x0000000003230ff0ull, 0x0000000009b9a55aull, 0x000000000c8c3fc0ull, 0x0000000006e6956aull,
        0x000000000230ff0cull, 0x000000000b9a55a6ull, 0x0000000008c3fc30ull, 0x000000000e69569aull,
    };
    return t[c];
}

template <>
__device__ __forceinline__ uint64_t fk_had_col<36>(int c) {
    constexpr uint64_t t[36] = {
        0x0000000000000002ull, 0x0000000aaaaaaaabull, 0x00000000cfc3f308ull, 0x0000000a656959aeull,
        0x000000033f0fcc20ull, 0x0000000995a566baull, 0x0000000cfc3f3080ull, 0x0000000656959aeaull,
        0x00000003f0fcc20cull, 0x000000095a566ba6ull, 0x0000000fc3f30830ull, 0x000000056959ae9aull,
        0x0000000f0fcc20ccull, 0x00000005a566ba66ull, 0x0000000c3f30833cull, 0x00000006959ae996ull,
        0x00000000fcc20cfcull, 0x0000000a566ba656ull, 0x00000003f30833f0ull, 0x0000000959ae995aull,
        0x0000000fcc20cfc0ull, 0x0000000566ba656aull, 0x0000000f30833f0cull, 0x000000059ae995a6ull,
        0x0000000cc20cfc3cull, 0x000000066ba65696ull, 0x000000030833f0fcull, 0x00000009ae995a56ull,
        0x0000000c20cfc3f0ull, 0x00000006ba65695aull, 0x00000000833f0fccull, 0x0000000ae995a566ull,
        0x000000020cfc3f30ull, 0x0000000ba656959aull, 0x0000000833f0fcc0ull, 0x0000000e995a566aull,
    };
    return t[c];
}

template <>
__device__ __forceinline__ uint64_t fk_had_col<44>(int c) {
    constexpr uint64_t t[44] = {
        0x00000ffffffffffeull, 0x000006b10747dca4ull, 0x00000d620e8fb948ull, 0x00000ac41d1f7292ull,
        0x000005883a3ee526ull, 0x00000b10747dca4cull, 0x00000620e8fb949aull, 0x00000c41d1f72934ull,
        0x00000883a3ee526aull, 0x0000010747dca4d6ull, 0x0000020e8fb949acull, 0x0000041d1f729358ull,
        0x0000083a3ee526b0ull, 0x000000747dca4d62ull, 0x000000e8fb949ac4ull, 0x000001d1f7293588ull,
        0x000003a3ee526b10ull, 0x00000747dca4d620ull, 0x00000e8fb949ac40ull, 0x00000d1f72935882ull,
        0x00000a3ee526b106ull, 0x0000047dca4d620eull, 0x000008fb949ac41cull, 0x000001f72935883aull,
        0x000003ee526b1074ull, 0x000007dca4d620e8ull, 0x00000fb949ac41d0ull, 0x00000f72935883a2ull,
        0x00000ee526b10746ull, 0x00000dca4d620e8eull, 0x00000b949ac41d1eull, 0x0000072935883a3eull,
        0x00000e526b10747cull, 0x00000ca4d620e8faull, 0x00000949ac41d1f6ull, 0x000002935883a3eeull,
        0x00000526b10747dcull, 0x00000a4d620e8fb8ull, 0x0000049ac41d1f72ull, 0x00000935883a3ee4ull,
        0x0000026b10747dcaull, 0x000004d620e8fb94ull, 0x000009ac41d1f728ull, 0x0000035883a3ee52ull,
    };
    return t[c];
}

template <>
__device__ __forceinline__ uint64_t fk_had_col<60>(int c) {
    constexpr uint64_t t[60] = {
        0x0ffffffffffffffeull, 0x0456c4307cf72574ull, 0x08ad8860f9ee4ae8ull, 0x015b10c1f3dc95d2ull,
        0x02b62183e7b92ba4ull, 0x056c4307cf725748ull, 0x0ad8860f9ee4ae90ull, 0x05b10c1f3dc95d22ull,
        0x0b62183e7b92ba44ull, 0x06c4307cf725748aull, 0x0d8860f9ee4ae914ull, 0x0b10c1f3dc95d22aull,
        0x062183e7b92ba456ull, 0x0c4307cf725748acull, 0x08860f9ee4ae915aull, 0x010c1f3dc95d22b6ull,
        0x02183e7b92ba456cull, 0x04307cf725748ad8ull, 0x0860f9ee4ae915b0ull, 0x00c1f3dc95d22b62ull,
        0x0183e7b92ba456c4ull, 0x0307cf725748ad88ull, 0x060f9ee4ae915b10ull, 0x0c1f3dc95d22b620ull,
        0x083e7b92ba456c42ull, 0x007cf725748ad886ull, 0x00f9ee4ae915b10cull, 0x01f3dc95d22b6218ull,
        0x03e7b92ba456c430ull, 0x07cf725748ad8860ull, 0x0f9ee4ae915b10c0ull, 0x0f3dc95d22b62182ull,
        0x0e7b92ba456c4306ull, 0x0cf725748ad8860eull, 0x09ee4ae915b10c1eull, 0x03dc95d22b62183eull,
        0x07b92ba456c4307cull, 0x0f725748ad8860f8ull, 0x0ee4ae915b10c1f2ull, 0x0dc95d22b62183e6ull,
        0x0b92ba456c4307ceull, 0x0725748ad8860f9eull, 0x0e4ae915b10c1f3cull, 0x0c95d22b62183e7aull,
        0x092ba456c4307cf6ull, 0x025748ad8860f9eeull, 0x04ae915b10c1f3dcull, 0x095d22b62183e7b8ull,
        0x02ba456c4307cf72ull, 0x05748ad8860f9ee4ull, 0x0ae915b10c1f3dc8ull, 0x05d22b62183e7b92ull,
        0x0ba456c4307cf724ull, 0x0748ad8860f9ee4aull, 0x0e915b10c1f3dc94ull, 0x0d22b62183e7b92aull,
        0x0a456c4307cf7256ull, 0x048ad8860f9ee4aeull, 0x0915b10c1f3dc95cull, 0x022b62183e7b92baull,
    };
    return t[c];
}

#endif
