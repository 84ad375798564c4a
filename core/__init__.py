"""alsub core: Alard-Lupton image subtraction as a library.

Pure science code: exposures, PSFs, sources, the AL solver, convolution,
decorrelation and the subtraction tasks. No web or queue imports here.
"""

__version__ = "0.1.0"
