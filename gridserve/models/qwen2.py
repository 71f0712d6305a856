from gridserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q/k/v (ModelConfig.attention_bias is True for model_type qwen2)."""
