"""radflow worklist: HL7 orders in over MLLP, the compacted worklist topic, and a DICOM
Modality Worklist C-FIND SCP answering from it."""
