"""The human side: THINGS triplet files and concepts, VICE (soft labels p* of human uncertainty), SPoSE."""
