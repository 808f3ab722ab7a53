"""What is done with a trained model: load it (.loading), and the `python -m llama_pt.pretrained` commands
(.commands: export to Hugging Face and to GGUF for llama.cpp, sample; .evaluation_commands: perplexity, eval
with lm-eval, whose model "llama_pt" .lm_eval_model registers; .weight_arithmetic's deltas and averages;
.resize, a model grown to a tokenizer that extends its vocabulary)."""
from .commands import main
from .loading import (export_checkpoint, is_hf_folder, load_checkpoint_model, load_hf_model, load_model,
                      load_model_and_tokenizer, tokenizer_of_checkpoint)

__all__ = ["export_checkpoint", "is_hf_folder", "load_checkpoint_model", "load_hf_model", "load_model",
           "load_model_and_tokenizer", "main", "tokenizer_of_checkpoint"]
