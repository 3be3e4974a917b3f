//! `client health`: the server's grpc.health.v1 status, optionally waiting for SERVING (what
//! scripts do after starting the services, instead of sleeping).

use std::time::{Duration, Instant};

use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::connect::{Conn, Service};
use crate::error::Result;
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service to ask about: by default the head-trainer's readiness (SERVING once a
    /// feature-server answers it, so enrolls and classifies work); `""` for liveness only
    /// (the process serves), `taxon.v1.Features` for a feature-server.
    #[arg(
        long,
        env = "TAXON_HEALTH_SERVICE",
        default_value = "taxon.v1.Classifier"
    )]
    pub service: String,
    /// Keep asking for up to this many seconds until the server is SERVING.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub wait: u64,
}

const POLL: Duration = Duration::from_millis(250);

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let status = loop {
        let attempt = check(ctx, &args.service).await;
        let retry = Instant::now() < deadline;
        match attempt {
            Ok(ServingStatus::Serving) => break ServingStatus::Serving,
            Ok(s) if !retry => break s,
            Err(e) if !retry => return Err(e),
            _ => tokio::time::sleep(POLL).await,
        }
    };
    let name = status.as_str_name();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({"server": ctx.server, "service": args.service, "status": name}),
        )?;
    } else {
        writeln!(ctx.out, "{name} ({})", ctx.server)?;
    }
    if status == ServingStatus::Serving {
        Ok(Outcome::Success)
    } else {
        Ok(Outcome::Failed(format!(
            "{} is {name}: it may still be warming up (try --wait 60) or its feature-server is down",
            ctx.server
        )))
    }
}

async fn check(ctx: &Ctx<'_>, service: &str) -> Result<ServingStatus> {
    let conn = Conn::connect(&ctx.server, Service::HeadTrainer, ctx.auth()?, &ctx.tls).await?;
    let reply = HealthClient::new(conn.channel())
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(conn.rpc_error("Health.Check"))?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
}
