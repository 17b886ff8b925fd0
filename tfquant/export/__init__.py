"""Export of quantized models: dense bit packing of integer codes and the packed-model container file."""
