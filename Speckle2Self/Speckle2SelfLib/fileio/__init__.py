"""Files: reading and writing images, volumes, sequences and DICOM (:mod:`.imageio`), and safe
output paths, atomic writes and one-line error messages (:mod:`.safeio`)."""
