from gridserve.models.decoder import DecoderLM


class LlamaForCausalLM(DecoderLM):
    """Llama: the decoder family's plain member (no q/k/v bias unless the config asks, no q/k norm)."""
