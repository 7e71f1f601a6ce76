"""Model construction: HF config -> Megatron GPTModel, layer specs, TP/PP sharding map."""
