//! Checks of the Kubernetes manifests in deploy/k8s, offline:
//!
//! - `k8s_manifests_are_consistent` (always runs): kustomization.yaml lists
//!   every manifest; the job TOML in the ConfigMap parses as an Ember job and
//!   its `cluster.shard_addrs` are exactly the StatefulSet's DNS names
//!   `<statefulset>-<i>.<service>:<grpc port>` for i in 0..replicas; the
//!   shards' `--num-shards` equals replicas; the headless Service selects the
//!   shard pods; probes, resources and Prometheus annotations are present;
//!   the workers are an Indexed Job with completions = parallelism =
//!   `cluster.workers`, whose pods take their index from JOB_COMPLETION_INDEX
//!   and reach the coordinator through the trainer's Service.
//!   YAML is read with `serde_norway` into `serde_json::Value`s.
//! - `k8s_manifests_validate_against_the_api_schemas`: installs the
//!   `kubernetes-validate` package from PyPI into the target directory (once)
//!   and validates every manifest strictly against the Kubernetes 1.28 (the
//!   oldest version the manifests support: the pod-index label) and the
//!   newest bundled API schemas (and the `kubectl kustomize` output when
//!   kubectl is installed). Returns early, saying why, when python3, pip
//!   or the package is unavailable, or EMBER_SKIP_K8S_VALIDATE=1.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use integration_tests::{bin_dir, repo_root};

/// Every non-empty document of a YAML file, as JSON values.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

// ------------------------------------------------------------- manifests

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

/// (file, document) for every resource listed in kustomization.yaml.
fn resources() -> Vec<(String, Value)> {
    let kust =
        &yaml_docs(&std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap())[0];
    let files: Vec<String> = kust["resources"]
        .as_array()
        .expect("kustomization resources")
        .iter()
        .map(|v| v.as_str().expect("resource path").to_string())
        .collect();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(k8s_dir().join(&f))
            .unwrap_or_else(|e| panic!("{f} listed in kustomization.yaml: {e}"));
        for d in yaml_docs(&text) {
            out.push((f.clone(), d));
        }
    }
    out
}

/// The manifests of the kustomization (top level of deploy/k8s).
fn manifest_files() -> Vec<PathBuf> {
    yaml_files(&k8s_dir())
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    v.sort();
    v
}

fn find<'a>(res: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    res.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn arg_value<'a>(args: &'a [Value], flag: &str) -> Option<&'a str> {
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

#[test]
fn k8s_manifests_are_consistent() {
    // kustomization.yaml lists every manifest file.
    let res = resources();
    let listed: std::collections::BTreeSet<String> = res.iter().map(|(f, _)| f.clone()).collect();
    for p in manifest_files() {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            listed.contains(&name),
            "{name} is not listed in kustomization.yaml"
        );
    }

    // The StatefulSet and its headless Service.
    let sts = find(&res, "StatefulSet");
    assert_eq!(sts.len(), 1, "one shard StatefulSet");
    let sts = sts[0];
    let sts_name = sts["metadata"]["name"].as_str().expect("statefulset name");
    let svc_name = sts["spec"]["serviceName"].as_str().expect("serviceName");
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas >= 1);
    let pod = &sts["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let args = c["args"].as_array().expect("ps-server args");
    let num_shards: u64 = arg_value(args, "--num-shards")
        .expect("--num-shards")
        .parse()
        .expect("--num-shards is a number");
    assert_eq!(
        num_shards, replicas,
        "--num-shards must equal spec.replicas"
    );
    assert_eq!(arg_value(args, "--shard-index"), Some("$(SHARD_INDEX)"));
    let env = c["env"].as_array().expect("env");
    let idx = env
        .iter()
        .find(|e| e["name"] == "SHARD_INDEX")
        .expect("SHARD_INDEX env");
    assert_eq!(
        idx["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert!(
        args.iter().any(|a| a == "--restore"),
        "shards must restore at start"
    );
    let listen = arg_value(args, "--listen").expect("--listen");
    let port: u64 = listen
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .expect("listen port");
    let ports = c["ports"].as_array().expect("container ports");
    let port_of = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    assert_eq!(port_of("grpc"), port, "--listen port vs containerPort grpc");
    let metrics_port = port_of("metrics");
    let maddr = arg_value(args, "--metrics-addr").expect("--metrics-addr");
    assert!(
        maddr.ends_with(&format!(":{metrics_port}")),
        "{maddr} vs {metrics_port}"
    );
    let ckdir = arg_value(args, "--checkpoint-dir").expect("--checkpoint-dir");
    let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("volumeClaimTemplates");
    assert!(
        c["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .any(|m| m["name"] == claim && m["mountPath"] == ckdir),
        "the checkpoint PVC must be mounted at --checkpoint-dir"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(c[probe].is_object(), "ps-server {probe}");
    }
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], metrics_port.to_string());

    let svc = find(&res, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == svc_name)
        .unwrap_or_else(|| panic!("Service {svc_name} (the StatefulSet's serviceName)"));
    assert_eq!(
        svc["spec"]["clusterIP"], "None",
        "the shard Service must be headless"
    );
    let labels = pod["metadata"]["labels"].as_object().expect("pod labels");
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(labels.get(k), Some(v), "Service selector {k} vs pod labels");
    }
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .expect("service ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(port)),
        "Service exposes the gRPC port {port}"
    );

    // The ConfigMap's job file names exactly those shards.
    let jobs = find(&res, "Job");
    assert_eq!(jobs.len(), 2, "a trainer Job and a workers Job");
    let job = jobs
        .iter()
        .copied()
        .find(|j| j["spec"]["completionMode"] != "Indexed")
        .expect("the trainer Job (not indexed)");
    let workers = jobs
        .iter()
        .copied()
        .find(|j| j["spec"]["completionMode"] == "Indexed")
        .expect("the workers: an Indexed Job");
    let tc = &job["spec"]["template"]["spec"]["containers"][0];
    let targs: Vec<&str> = tc["args"]
        .as_array()
        .expect("trainer args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let cfg_path = targs
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("trainer --config");
    let (cfg_dir, cfg_file) = cfg_path.rsplit_once('/').expect("absolute --config");
    let mount = tc["volumeMounts"]
        .as_array()
        .expect("trainer volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == cfg_dir)
        .unwrap_or_else(|| panic!("nothing mounted at {cfg_dir}"));
    let vol = job["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("trainer volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("config volume");
    let cm_name = vol["configMap"]["name"]
        .as_str()
        .expect("config volume is a ConfigMap");
    let cm = find(&res, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("ConfigMap {cm_name}"));
    let toml_text = cm["data"][cfg_file]
        .as_str()
        .expect("job TOML in the ConfigMap");
    let cfg = ember_worker::train::config::JobConfig::parse(toml_text, "ConfigMap ember-job")
        .unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<String> = (0..replicas)
        .map(|i| format!("{sts_name}-{i}.{svc_name}:{port}"))
        .collect();
    assert_eq!(
        cfg.cluster.shard_addrs, want,
        "cluster.shard_addrs must be the StatefulSet's DNS names"
    );
    for path in [&cfg.data.train, &cfg.data.test] {
        assert!(
            path.starts_with("/data"),
            "{} is not on the data volume",
            path.display()
        );
    }
    assert!(
        cfg.out_dir().starts_with("/var/lib/ember/runs"),
        "out_dir on the runs volume"
    );

    // The workers: one pod per index of an Indexed Job, as many as the job's
    // cluster.workers, all running at once (synchronous training needs them).
    assert_eq!(
        cfg.cluster.worker_mode.as_str(),
        "external",
        "the ConfigMap's job must set cluster.worker_mode = \"external\""
    );
    let m = cfg.cluster.workers as u64;
    assert_eq!(
        workers["spec"]["completions"].as_u64(),
        Some(m),
        "workers Job completions vs cluster.workers"
    );
    assert_eq!(
        workers["spec"]["parallelism"].as_u64(),
        Some(m),
        "workers Job parallelism vs cluster.workers"
    );
    let wpod = &workers["spec"]["template"]["spec"];
    assert_eq!(
        wpod["restartPolicy"], "Never",
        "podFailurePolicy and backoffLimitPerIndex need restartPolicy Never"
    );
    let wc = &wpod["containers"][0];
    assert_eq!(wc["command"][0], "worker");
    let wargs = wc["args"].as_array().expect("worker args");
    assert_eq!(
        arg_value(wargs, "--worker-index"),
        Some("$(JOB_COMPLETION_INDEX)"),
        "the worker index is the completion index"
    );
    let wenv = wc["env"].as_array().expect("worker env");
    let jci = wenv
        .iter()
        .find(|e| e["name"] == "JOB_COMPLETION_INDEX")
        .expect("JOB_COMPLETION_INDEX env");
    assert_eq!(
        jci["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    // The worker reads the same job file from the same ConfigMap.
    let wcfg = arg_value(wargs, "--config").expect("worker --config");
    assert_eq!(wcfg, cfg_path, "worker and trainer read the same job file");
    let wmount = wc["volumeMounts"]
        .as_array()
        .expect("worker volumeMounts")
        .iter()
        .find(|mt| mt["mountPath"] == cfg_dir)
        .expect("worker: job file mount");
    let wvol = wpod["volumes"]
        .as_array()
        .expect("worker volumes")
        .iter()
        .find(|v| v["name"] == wmount["name"])
        .expect("worker config volume");
    assert_eq!(wvol["configMap"]["name"], cm_name);
    for path in [&cfg.data.train, &cfg.data.test] {
        let dir = path.parent().expect("data dir");
        assert!(
            wc["volumeMounts"]
                .as_array()
                .expect("worker volumeMounts")
                .iter()
                .filter_map(|mt| mt["mountPath"].as_str())
                .any(|mp| dir.starts_with(mp)),
            "worker pods must mount {}",
            dir.display()
        );
    }
    // --coordinator=<service>:<port> resolves to the trainer pod's
    // coordinator port, which is where cluster.coordinator_listen binds.
    let coord = arg_value(wargs, "--coordinator").expect("worker --coordinator");
    let (chost, cport) = coord.rsplit_once(':').expect("--coordinator host:port");
    let cport: u64 = cport.parse().expect("coordinator port");
    let tsvc = find(&res, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == chost)
        .unwrap_or_else(|| panic!("no Service {chost:?} for --coordinator={coord}"));
    let tlabels = job["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("trainer pod labels");
    for (k, v) in tsvc["spec"]["selector"]
        .as_object()
        .expect("trainer selector")
    {
        assert_eq!(
            tlabels.get(k),
            Some(v),
            "Service {chost} selector {k} vs trainer pod labels"
        );
    }
    let sport = tsvc["spec"]["ports"]
        .as_array()
        .expect("trainer Service ports")
        .iter()
        .find(|p| p["port"].as_u64() == Some(cport))
        .unwrap_or_else(|| panic!("Service {chost} has no port {cport}"));
    let tports = tc["ports"].as_array().expect("trainer container ports");
    let target = tports
        .iter()
        .find(|p| p["name"] == sport["targetPort"] || p["containerPort"] == sport["targetPort"])
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("trainer has no container port {}", sport["targetPort"]));
    let listen_port: u64 = cfg
        .cluster
        .coordinator_listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("coordinator_listen port");
    assert_eq!(
        target, listen_port,
        "the trainer Service's target port vs cluster.coordinator_listen"
    );

    // TLS + token everywhere: the shards get certificate, key and token files,
    // never --insecure; the job's [security] is "tls"; every file they name
    // lies under a mount of the same Secret in the pod that reads it.
    assert!(
        !args.iter().any(|a| a == "--insecure"),
        "shards must not run --insecure"
    );
    assert_eq!(
        cfg.security.mode().as_str(),
        "tls",
        "job.toml [security] mode"
    );
    let secret_mount = |pod: &Value, what: &str, path: &str| -> String {
        let vols = pod["volumes"].as_array().expect("volumes");
        let mounts = pod["containers"][0]["volumeMounts"]
            .as_array()
            .expect("volumeMounts");
        let m = mounts
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|mp| path.starts_with(&format!("{mp}/")))
            })
            .unwrap_or_else(|| panic!("{what}: nothing mounted over {path}"));
        let v = vols
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("{what}: no volume {}", m["name"]));
        v["secret"]["secretName"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {path} is not from a Secret"))
            .to_string()
    };
    let mut secrets = std::collections::BTreeSet::new();
    for flag in ["--tls-cert", "--tls-key", "--auth-token-file"] {
        let path = arg_value(args, flag).unwrap_or_else(|| panic!("shards need {flag}"));
        secrets.insert(secret_mount(&pod["spec"], "shard", path));
    }
    let sec = &cfg.security;
    let files = [&sec.ca, &sec.cert, &sec.key, &sec.token_file];
    for f in files {
        let path = f
            .as_ref()
            .expect("[security] ca, cert, key and token_file")
            .to_str()
            .unwrap();
        secrets.insert(secret_mount(
            &job["spec"]["template"]["spec"],
            "trainer",
            path,
        ));
        if f != &sec.cert && f != &sec.key {
            secrets.insert(secret_mount(wpod, "worker", path));
        }
    }
    assert_eq!(secrets.len(), 1, "one TLS Secret for everyone: {secrets:?}");

    // Every container has requests and limits.
    for (f, d) in &res {
        let spec = match d["kind"].as_str() {
            Some("StatefulSet") | Some("Job") => &d["spec"]["template"]["spec"],
            _ => continue,
        };
        for c in spec["containers"].as_array().expect("containers") {
            for k in ["requests", "limits"] {
                assert!(
                    !c["resources"][k]["cpu"].is_null() && !c["resources"][k]["memory"].is_null(),
                    "{f}: container {} needs resources.{k}.cpu/memory",
                    c["name"]
                );
            }
        }
    }
}

/// A Python path where `kubernetes_validate` imports, installing it there if needed.
fn kubernetes_validate() -> Result<PathBuf, String> {
    let dir = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
        .join("kubernetes-validate");
    let imports = |d: &Path| {
        Command::new("python3")
            .args(["-c", "import kubernetes_validate"])
            .env("PYTHONPATH", d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports(&dir) {
        return Ok(dir);
    }
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Err("python3 is not available".into()),
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .arg("kubernetes-validate")
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`pip install kubernetes-validate` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if imports(&dir) {
        Ok(dir)
    } else {
        Err("kubernetes_validate does not import after installing it".into())
    }
}

#[test]
fn k8s_manifests_validate_against_the_api_schemas() {
    if std::env::var("EMBER_SKIP_K8S_VALIDATE").is_ok_and(|v| v == "1") {
        integration_tests::skip(
            integration_tests::Prereq::K8sValidate,
            "EMBER_SKIP_K8S_VALIDATE=1",
        );
        return;
    }
    let py_path = match kubernetes_validate() {
        Ok(p) => p,
        Err(why) => {
            integration_tests::skip(integration_tests::Prereq::K8sValidate, &why);
            return;
        }
    };
    let mut files = manifest_files();
    assert!(files.len() >= 5, "manifests in deploy/k8s: {files:?}");
    // Helper manifests outside the kustomization.
    files.extend(yaml_files(&k8s_dir().join("tools")));
    // The kustomize output too, when kubectl (with its built-in kustomize) is here.
    let rendered_dir = tempfile::tempdir().expect("tempdir");
    match Command::new("kubectl")
        .arg("kustomize")
        .arg(k8s_dir())
        .output()
    {
        Ok(o) if o.status.success() => {
            let p = rendered_dir.path().join("rendered.yaml");
            std::fs::write(&p, &o.stdout).expect("write rendered manifests");
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                text.contains("namespace: ember"),
                "kustomize sets the namespace"
            );
            files.push(p);
        }
        Ok(o) => panic!(
            "kubectl kustomize deploy/k8s failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => eprintln!("note: kubectl not found; not rendering the kustomization"),
    }
    // 1.28: the oldest version with the pod-index label; none: the newest schemas.
    for version in [Some("1.28.0"), None] {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"])
            .env("PYTHONPATH", &py_path);
        if let Some(v) = version {
            cmd.args(["--kubernetes-version", v]);
        }
        let out = cmd.args(&files).output().expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "kubernetes-validate (version {}) failed:\n{text}",
            version.unwrap_or("newest")
        );
        eprintln!(
            "kubernetes-validate --strict (version {}): {} files passed",
            version.unwrap_or("newest"),
            files.len()
        );
    }
}
