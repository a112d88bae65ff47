"""File formats: MRC (mrcfile), STAR (starfile) with RELION labels, IMOD text files."""
