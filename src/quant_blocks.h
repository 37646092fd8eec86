// Byte layouts of the quantized weight blocks (as GGUF stores them) and of the 8-bit activation
// blocks the integer matmul kernels pair them with.
#pragma once
#include <cstdint>

namespace glmoe {

constexpr int QK32 = 32;   // elements per block of the *_0 types
constexpr int QK_K = 256;  // elements per super-block of the K-quants

// All f16 fields are kept as raw bits; every struct is byte-aligned like the file.
struct BlockQ8_0 {
    uint16_t d;
    int8_t qs[32];
};
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[16];  // element j in the low nibble of qs[j], element j+16 in its high nibble
};
struct BlockQ5_0 {
    uint16_t d;
    uint8_t qh[4];   // bit j of this little-endian u32 is bit 4 of element j
    uint8_t qs[16];  // low 4 bits, nibble order as Q4_0
};
// Eight sub-blocks of 32. Bytes 0-3: low 6 bits = scales 0-3, top 2 bits = high bits of scales 4-7;
// bytes 4-7: the same for mins; bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble of mins 4-7.
struct BlockQ4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[128];  // 32-byte chunk c: sub-block 2c in the low nibbles, 2c+1 in the high
};
struct BlockQ5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[32];   // bit s of qh[e] is bit 4 of element e of sub-block s
    uint8_t qs[128];  // as Q4_K
};
// Sixteen sub-blocks of 16, two halves of 128 elements. In half h, element l (0-127) has its low
// 4 bits in ql[64h + l%64] (low nibble for l<64, high otherwise) and its high 2 bits in
// qh[32h + l%32] at bit 2*(l/32).
struct BlockQ6_K {
    uint8_t ql[128];
    uint8_t qh[64];
    int8_t scales[16];
    uint16_t d;
};

static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ5_0) == 22, "layout");
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210, "layout");

// Activations for the 32-element types, two blocks per pair: x ~= d[j] * (element of block j).
// q holds elements 0-15 of block 0, 0-15 of block 1, 16-31 of block 0, 16-31 of block 1: the order
// in which two Q4_0 blocks' nibbles unpack, so in an integer dot product the 32-bit lanes 0-3 of
// each 256-bit half belong to block 0 and lanes 4-7 to block 1.
// q is stored offset by 128 (unsigned bytes, q + 128 in 1-255) so that it can meet signed weight
// bytes in a u8 x s8 dot product directly. An odd last block is paired with zeros (stored as 128).
struct ActQ8x2 {
    float d[2];
    uint8_t q[64];
};

// Activation super-block for the K-quants: x ~= d * q. dsum[j] = d * (sum of the 16 elements
// 16j .. 16j+15 in natural order), for the sub-block mins / offsets. For Q4_K and Q5_K the 32-element
// groups of q are stored in the order 0 2 1 3 4 6 5 7, so that the 64 weights of one 64-byte load
// of qs (low nibbles: sub-blocks 4p and 4p+2; high nibbles: 4p+1 and 4p+3) meet contiguous
// activations.
struct ActQ8K {
    float d;
    float dsum[16];
    int8_t q[256];
};
constexpr int kInterleavedGroup[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // its own inverse

// Unpacks the Q4_K / Q5_K 12-byte scale field into scales[0..7] and mins[0..7] (each 6 bits).
inline void unpack_k_scales(const uint8_t* packed, uint8_t* scales, uint8_t* mins) {
    for (int j = 0; j < 4; ++j) {
        scales[j] = packed[j] & 63;
        mins[j] = packed[j + 4] & 63;
        scales[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
}

}  // namespace glmoe
