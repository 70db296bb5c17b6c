{#- Opening of both convolution templates (after their description): the
    linear prelude and the tile constants both kernels share. Include it as
    `{% include "conv_prelude.cu" -%}` (the file ends in a newline). -#}
{%- include "linear_prelude.cu" -%}
constexpr int DV = {{ value_dim }};
constexpr int BLOCK_M = {{ config.block_m }};
constexpr int BLOCK_N = {{ config.block_n }};
constexpr int BDV = {{ block_dv }};
constexpr int DV_BLOCKS = {{ dv_blocks }};
