"""Instruction tuning data: Alpaca and ShareGPT records read into conversations (.records), prompt templates as
data (.templates; configs/templates/), and tokenized examples packed into training windows with a loss mask
on the responses (.samples). The trainer reads it under task=sft (llama_pt.train.data_setup)."""
from .records import Conversation, ReadReport, read_conversations
from .samples import Example, InstructSamples, InstructionData, build_examples, open_instruction_data
from .templates import ChatTemplate, encode, load_template, render

__all__ = ["ChatTemplate", "Conversation", "Example", "InstructSamples", "InstructionData", "ReadReport",
           "build_examples", "encode", "load_template", "open_instruction_data", "read_conversations", "render"]
