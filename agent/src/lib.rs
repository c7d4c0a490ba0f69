//! allot's metering server (filled by the metering-server issue).
#![forbid(unsafe_code)]
