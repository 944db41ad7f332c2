"""The identity adapter on Wan2.1-VACE: base components, FaceMapper, LoRA, identity folders, inference.

Modules: ``components`` (tiny / real base model), ``mapper`` (FaceMapper), ``lora`` (peft LoRA,
diffusers file format), ``identity`` (identity folders + cards), ``generate`` (inference core).
"""
