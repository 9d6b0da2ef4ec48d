"""m3vit-hw: an Amaranth HDL generator for the M³ViT mixture-of-experts vision transformer.

The package is layered; imports only point down the list:

* top level: :mod:`.numerics` (integer formats), :mod:`.model_config` (the M³ViT model),
  :mod:`.config` (:class:`AcceleratorConfig`, the one object every size is read from),
  :mod:`.checks` (the shared parameter check);
* :mod:`.lib`: generic pieces (divider, integer square root, external-memory port, read arbiter);
* :mod:`.gemm`: the PE array, the shared GEMM engine and its epilogue stages;
* :mod:`.rowops`: row operations (LayerNorm, softmax);
* :mod:`.moe`: router, top-k, expert queues, reordering controller, weight double buffer, streamer,
  the external-memory layout of a MoE layer and the :class:`MoELayer` top;
* :mod:`.attention`: the attention sub-layer on the shared GEMM engine (:class:`AttentionLayer`), its
  external-memory layout and buffer map (it reuses the weight buffer and streamer of :mod:`.moe`);
* :mod:`.control`: the instruction format of the program-driven sequencer, the compiler and the image;
* :mod:`.encoder`: the encoder top (:class:`EncoderTop`): the shared datapath, the program sequencer,
  the GEMM executor and the store DMA.

What users instantiate is re-exported here::

    from m3vit_hw import AcceleratorConfig, ModelConfig, MoELayer
"""

from .config import ACCEL_PRESETS, AcceleratorConfig
from .model_config import PRESETS, ModelConfig, preset
from .gemm import GemmEngine, PEArray
from .rowops import LayerNormUnit, SoftmaxUnit
from .moe import MoELayer
from .attention import AttentionLayer
from .encoder import EncoderTop

__all__ = [
    "AcceleratorConfig", "ACCEL_PRESETS", "ModelConfig", "PRESETS", "preset",
    "GemmEngine", "PEArray", "LayerNormUnit", "SoftmaxUnit", "MoELayer",
    "AttentionLayer", "EncoderTop",
]
