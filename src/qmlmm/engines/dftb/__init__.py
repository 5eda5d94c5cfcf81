"""SCC-DFTB2/DFTB3 in PyTorch with electrostatic embedding of MM point charges."""
