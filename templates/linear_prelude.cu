{#- Opening of the chunkwise and convolution templates: device helpers and the
    anonymous namespace up to the head constants. Include it as
    `{% include "linear_prelude.cu" -%}` (the file ends in a newline). -#}
{%- include "tile.cuh" %}
{% include "chunkwise_common.cu" %}

namespace {
using namespace mixc;
using namespace mixc_cw;

typedef {{ elem_type }} T;

constexpr int HEADS = {{ heads }};
constexpr int KV_HEADS = {{ kv_heads }};
constexpr int KV_GROUP = HEADS / KV_HEADS;
