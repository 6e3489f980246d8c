//! A small blocking client of the per-VM API, for the CLI: one connection per request,
//! driven by a throwaway current-thread runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::server::{ApiError, VmDescription};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request to the VM failed")]
    Http(#[from] hyper::Error),
    /// The VM did not answer in time.
    #[error("the VM did not answer within {0:?}")]
    Timeout(Duration),
    /// The VM answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error kind from the body.
        kind: String,
        /// The message from the body.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer from the VM: {0}")]
    Decode(String),
    /// Writing streamed output failed.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// A client of one VM's API socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the API at `socket`; requests time out after 30 s (streams do not).
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The same client with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot start a tokio runtime")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if !body.is_empty() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(sender.send_request(req).await?)
    }

    /// Sends a request and returns the status and the whole body, whatever the status.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let rt = Self::runtime();
        rt.block_on(async {
            let work = async {
                let resp = self.send(method, path, body).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, ClientError>((status, bytes))
            };
            tokio::time::timeout(self.timeout, work)
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?
        })
    }

    /// Sends a request; a 2xx answer's body is returned, others become [`ClientError::Api`].
    pub fn request(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, ClientError> {
        let (status, bytes) = self.raw(method, path, body)?;
        if status.is_success() {
            return Ok(bytes);
        }
        let (kind, message) = match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => (e.error, e.message),
            Err(_) => (
                "unknown".into(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ),
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            kind,
            message,
        })
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let bytes = self.request(method, path, body)?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /v1/vm`.
    pub fn info(&self) -> Result<VmDescription, ClientError> {
        self.json(Method::GET, "/v1/vm", Vec::new())
    }

    /// `POST /v1/vm/pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.request(Method::POST, "/v1/vm/pause", Vec::new())
            .map(drop)
    }

    /// `POST /v1/vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.request(Method::POST, "/v1/vm/resume", Vec::new())
            .map(drop)
    }

    /// `POST /v1/vm/shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.request(Method::POST, "/v1/vm/shutdown", Vec::new())
            .map(drop)
    }

    /// `POST /v1/vm/fork`.
    pub fn fork(
        &self,
        req: &crate::wire::ForkRequest,
    ) -> Result<crate::wire::ForkOutcome, ClientError> {
        let body = serde_json::to_vec(req).expect("a ForkRequest serializes");
        self.json(Method::POST, "/v1/vm/fork", body)
    }

    /// `POST /v1/vm/template`: save the VM as a template in `dir` (absolute).
    pub fn save_template(&self, dir: &Path) -> Result<crate::wire::TemplateInfo, ClientError> {
        let body =
            serde_json::to_vec(&serde_json::json!({ "dir": dir })).expect("a path serializes");
        self.json(Method::POST, "/v1/vm/template", body)
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let b = self.request(Method::GET, "/metrics", Vec::new())?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// `GET /v1/vm/console[?follow=true]`: hands the console to `sink` as it arrives,
    /// until the stream ends (the VM stopped, or at the end of the log without `follow`).
    pub fn console(
        &self,
        follow: bool,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let path = if follow {
            "/v1/vm/console?follow=true"
        } else {
            "/v1/vm/console"
        };
        let rt = Self::runtime();
        rt.block_on(async {
            let resp = tokio::time::timeout(self.timeout, self.send(Method::GET, path, Vec::new()))
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))??;
            if !resp.status().is_success() {
                return Err(ClientError::Api {
                    status: resp.status().as_u16(),
                    kind: "unknown".into(),
                    message: "the console cannot be streamed".into(),
                });
            }
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(data) = f.data_ref() {
                            sink(data).map_err(ClientError::Output)?;
                        }
                    }
                    // The VMM went away mid-stream: what it sent is all there is.
                    Err(e) if follow => {
                        tracing::debug!(error = %e, "console stream ended");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
    }
}
