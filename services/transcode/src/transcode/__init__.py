"""radflow transcode: every received instance gets a canonical lossless variant whose
pixels are proven identical to the original's, or a dead letter saying why not."""
