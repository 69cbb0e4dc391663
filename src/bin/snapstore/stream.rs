//! `commit -`: a stream taken as whole only where its end says so. A pipe cannot tell a producer that finished
//! from one that died midway, so the producer may be given to snapstore to run (`-- COMMAND`): its output is
//! committed only if it exits with status 0. An empty stream, what a producer that failed at once or a closed
//! stdin gives, is refused unless asked for.

use std::io::{self, Read};
use std::process::{Child, ChildStdout, Command, Stdio};

use snapstore::Error;

use crate::Failure;

/// A reader that fails at its end if it gave no byte, unless an empty stream is allowed.
pub struct Checked<R> {
    inner: R,
    allow_empty: bool,
    read: u64,
}

impl<R: Read> Checked<R> {
    pub fn new(inner: R, allow_empty: bool) -> Self {
        Checked { inner, allow_empty, read: 0 }
    }
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if n == 0 && !buf.is_empty() && self.read == 0 && !self.allow_empty {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream was empty (a producer that failed, or a closed stdin, gives one): nothing committed; \
                 pass --allow-empty to record an empty state",
            ));
        }
        Ok(n)
    }
}

/// The command whose standard output is committed; its end is checked when the output ends.
pub struct Producer {
    child: Child,
    stdout: ChildStdout,
    shown: String,
    ended: bool,
}

impl Producer {
    pub fn spawn(command: &[String]) -> Result<Producer, Failure> {
        let (program, args) = command.split_first().ok_or_else(|| Failure::Usage("no command after --".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::InvalidInput(format!("cannot run {program}: {e}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(Producer { child, stdout, shown: command.join(" "), ended: false })
    }
}

impl Read for Producer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.ended {
            self.ended = true;
            let status = self.child.wait()?;
            if !status.success() {
                return Err(io::Error::other(format!("`{}` failed ({status}): nothing committed", self.shown)));
            }
        }
        Ok(n)
    }
}

impl Drop for Producer {
    /// A commit that failed before the output ended stops the producer, which would otherwise write on into a
    /// closed pipe or wait on it.
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).map(|_| out)
    }

    #[test]
    fn an_empty_stream_is_refused_unless_allowed() {
        let err = read_all(Checked::new(&b""[..], false)).unwrap_err();
        assert!(err.to_string().contains("--allow-empty"), "{err}");
        assert!(read_all(Checked::new(&b""[..], true)).unwrap().is_empty());
        assert_eq!(read_all(Checked::new(&b"state"[..], false)).unwrap(), b"state");
    }

    #[test]
    fn a_producer_that_fails_fails_the_read_at_its_end() {
        let sh = |script: &str| Producer::spawn(&["sh".into(), "-c".into(), script.into()]).ok().unwrap();
        assert_eq!(read_all(sh("printf state")).unwrap(), b"state");
        let err = read_all(sh("printf partial; exit 3")).unwrap_err();
        assert!(err.to_string().contains("exit status: 3") && err.to_string().contains("nothing committed"), "{err}");
        let err = read_all(sh("printf partial; kill -9 $$")).unwrap_err();
        assert!(err.to_string().contains("signal: 9"), "{err}");
    }
}
