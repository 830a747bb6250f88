using System.Text.Json.Nodes;
using Distributed.Cli;
using Distributed.Cluster.Config;
using Distributed.Core;
using Xunit.Abstractions;

namespace Distributed.Tests;

/// <summary>
/// A test that needs node, npm and kubectl (`.ci/run` installs what a CI machine lacks) and the JobSet CRD in
/// ../shared/k8s-schemas. Where one is missing it is skipped with the reason, except in CI ($CI set), where it runs
/// and fails: there a missing tool is a broken .ci/run, not a reason to pass.
/// </summary>
public sealed class KubernetesToolsFactAttribute : FactAttribute
{
    static readonly Lazy<string?> Missing = new(() =>
    {
        var missing = new List<string>();
        if (!TestProcesses.Works("node")) missing.Add("node");
        if (!TestProcesses.Works("npm")) missing.Add("npm");
        if (!TestProcesses.Works("kubectl", "version", "--client")) missing.Add("kubectl");
        if (!File.Exists(KubernetesManifestTests.JobSetCrd)) missing.Add(KubernetesManifestTests.JobSetCrd);
        return missing.Count == 0 ? null : $"needs {string.Join(", ", missing)} (.ci/run installs them)";
    });

    public KubernetesToolsFactAttribute()
    {
        if (Missing.Value is { } reason && string.IsNullOrEmpty(Environment.GetEnvironmentVariable("CI"))) Skip = reason;
    }
}

/// <summary>
/// k8s/base and k8s/overlays/jobset, rendered by kustomize as an operator would apply them: every document is valid
/// for the Kubernetes API (k8s/validate: built-in kinds with kubernetes-models, the JobSet with its CRD's schema, unknown
/// fields rejected), manifests broken on purpose are caught, and the documents say what the program expects (the
/// exit codes, the coordinator's DNS name as the workers' seed, the probes' port, the values of values.yaml).
/// </summary>
public class KubernetesManifestTests(ITestOutputHelper output)
{
    public static readonly string JobSetCrd = Path.GetFullPath(Path.Combine(TestSupport.RepoRoot, "..", "shared", "k8s-schemas", "jobset.x-k8s.io_jobsets.yaml"));
    static readonly string Validator = Path.Combine(TestSupport.RepoRoot, "k8s", "validate");
    static readonly TimeSpan ToolTimeout = TimeSpan.FromMinutes(2);

    [KubernetesToolsFact]
    public void TheBaseAndTheJobSetOverlayRenderToValidManifestsAndBrokenOnesAreCaught()
    {
        EnsureValidatorInstalled();
        string dir = TestSupport.TempDir("manifests");
        string baseFile = Write(dir, "base.yaml", Render("k8s/base"));
        string jobSetFile = Write(dir, "jobset.yaml", Render("k8s/overlays/jobset"));
        string valuesFile = Path.Combine(TestSupport.RepoRoot, "k8s", "base", "values.yaml");
        var valid = RunValidator(["--json-dir", dir, valuesFile, baseFile, jobSetFile]);
        output.WriteLine(valid.Stdout);
        Assert.True(valid.ExitCode == 0, $"the validator rejected the manifests:\n{valid.Output}");
        IReadOnlyList<JsonNode> Documents(string file) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, Path.GetFileName(file) + ".json")))!.AsArray().Select(d => d!).ToList();
        var values = ValuesOf(Documents(valuesFile).Single());
        var (baseDocs, jobSetDocs) = (Documents(baseFile), Documents(jobSetFile));

        // Broken on purpose: each must fail, naming the field.
        string baseYaml = File.ReadAllText(baseFile), jobSetYaml = File.ReadAllText(jobSetFile);
        (string What, string Yaml, string Expected)[] broken =
        [
            ("a typo in a field name (StatefulSet)", ReplaceFirst(baseYaml, "\n  replicas: 1\n", "\n  replicaz: 1\n"), "spec.replicaz: unknown field"),
            ("a typo deep in a pod template (StatefulSet)", ReplaceFirst(baseYaml, "        - name: POD_IP\n", "        - nmae: POD_IP\n"), "env[0].nmae: unknown field"),
            ("a wrong type (Job)", ReplaceFirst(baseYaml, "\n  parallelism: 2\n", "\n  parallelism: two\n"), "spec/parallelism must be integer"),
            ("a value outside its enum (JobSet)", ReplaceFirst(jobSetYaml, "startupPolicyOrder: InOrder", "startupPolicyOrder: Sometimes"),
                "/spec/startupPolicy/startupPolicyOrder: must be equal to one of the allowed values"),
            ("a typo in a field name (JobSet)", ReplaceFirst(jobSetYaml, "    replicas: 1\n", "    replicaz: 1\n"), "must NOT have additional properties 'replicaz'"),
            ("an unknown kind", baseYaml + "---\napiVersion: batch/v1\nkind: Jobb\nmetadata: {name: x}\n", "unknown kind batch/v1 Jobb"),
        ];
        var files = broken.Select((b, i) => Write(dir, $"broken-{i}.yaml", b.Yaml)).ToList();
        var report = RunValidator(files);
        Assert.Equal(1, report.ExitCode);
        var sections = report.Stdout.Split("== ", StringSplitOptions.RemoveEmptyEntries);
        for (int i = 0; i < broken.Length; i++)
        {
            string section = sections.Single(s => s.StartsWith(files[i], StringComparison.Ordinal));
            output.WriteLine($"broken on purpose, {broken[i].What}:\n{string.Join('\n', section.Split('\n').Skip(1).Where(l => !l.StartsWith("ok ", StringComparison.Ordinal)))}");
            Assert.Contains(broken[i].Expected, section);
            Assert.DoesNotContain(", 0 invalid", section);
        }

        CheckBase(baseDocs, values);
        CheckJobSet(jobSetDocs, baseDocs, values);
    }

    [KubernetesToolsFact]
    public void TheTlsOverlayRendersValidManifestsThatGiveEveryNodeTheSecretsCertificates()
    {
        EnsureValidatorInstalled();
        string dir = TestSupport.TempDir("manifests-tls");
        string file = Write(dir, "tls.yaml", Render("k8s/overlays/tls"));
        var valid = RunValidator(["--json-dir", dir, file]);
        Assert.True(valid.ExitCode == 0, $"the validator rejected the TLS overlay:\n{valid.Output}");
        var docs = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tls.yaml.json")))!.AsArray().Select(d => d!).ToList();
        string certificates = Distributed.Cli.NodeSecurity.DefaultCertificates;
        void MountsTheSecret(JsonNode pod, JsonNode container)
        {
            var volume = pod["spec"]!["volumes"]!.AsArray().Single(v => (string?)v!["name"] == "certs")!;
            Assert.Equal("dtrain-certs", (string?)volume["secret"]!["secretName"]);
            Assert.Contains(container["volumeMounts"]!.AsArray(), m => (string?)m!["name"] == "certs" && (string?)m["mountPath"] == certificates);
            Assert.Equal(1654, (int)pod["spec"]!["securityContext"]!["fsGroup"]!);   // the image's user reads the key through the group
        }
        var coordinatorPod = Find(docs, "StatefulSet", "dtrain-coordinator")["spec"]!["template"]!;
        var coordinator = Container(coordinatorPod, "dtrain");
        Assert.Contains("--set=security.mode=tls", Args(coordinator));
        Assert.Contains($"--set=security.certificates={certificates}", Args(coordinator));
        MountsTheSecret(coordinatorPod, coordinator);
        var workerPod = Find(docs, "Job", "dtrain-workers")["spec"]!["template"]!;
        var worker = Container(workerPod, "dtrain");
        Assert.Equal("tls", Option(Args(worker), "--security"));
        Assert.Equal(certificates, Option(Args(worker), "--certs"));
        MountsTheSecret(workerPod, worker);
    }

    /// <summary>What the base says must agree with the program and with values.yaml.</summary>
    static void CheckBase(IReadOnlyList<JsonNode> docs, IReadOnlyDictionary<string, string> values)
    {
        int workers = int.Parse(values["workers"]);
        var service = Find(docs, "Service", "dtrain");
        Assert.Equal("None", (string?)service["spec"]!["clusterIP"]);
        Assert.True((bool)service["spec"]!["publishNotReadyAddresses"]!);

        var coordinatorSet = Find(docs, "StatefulSet", "dtrain-coordinator");
        Assert.Equal(1, (int)coordinatorSet["spec"]!["replicas"]!);
        Assert.Equal("dtrain", (string?)coordinatorSet["spec"]!["serviceName"]);
        var coordinatorPod = coordinatorSet["spec"]!["template"]!;
        var coordinator = Container(coordinatorPod, "dtrain");
        var coordinatorArgs = Args(coordinator);
        Assert.Equal(values["workers"], Env(coordinator, "DTRAIN_WORKERS"));
        Assert.Equal(values["tp"], Env(coordinator, "DTRAIN_TP"));
        Assert.Equal(values["pp"], Env(coordinator, "DTRAIN_PP"));
        Assert.Equal(values["submission"], Env(coordinator, "DTRAIN_SUBMISSION"));
        Assert.Equal("true", Env(coordinator, "DTRAIN_LINGER"));   // a StatefulSet restarts a process that exits
        Assert.Equal("status.podIP", (string?)EnvEntry(coordinator, "POD_IP")["valueFrom"]!["fieldRef"]!["fieldPath"]);
        Assert.Contains("$(POSTGRES_PASSWORD)", Env(coordinator, Cluster.CoordinatorPersistence.PostgresEnvironmentVariable));
        Assert.Equal("dtrain-postgres", (string?)EnvEntry(coordinator, "POSTGRES_PASSWORD")["valueFrom"]!["secretKeyRef"]!["name"]);
        Assert.NotNull(Find(docs, "Secret", "dtrain-postgres")["stringData"]!["password"]);

        var job = Find(docs, "Job", "dtrain-workers");
        var spec = job["spec"]!;
        Assert.Equal("Indexed", (string?)spec["completionMode"]);
        Assert.Equal(workers, (int)spec["completions"]!);
        Assert.Equal(workers, (int)spec["parallelism"]!);
        Assert.True((int)spec["backoffLimitPerIndex"]! >= 1);
        CheckPodFailurePolicy(spec["podFailurePolicy"]!);
        var workerPod = spec["template"]!;
        Assert.Equal("Never", (string?)workerPod["spec"]!["restartPolicy"]);
        var worker = Container(workerPod, "dtrain");
        var workerArgs = Args(worker);
        // The workers' seed is the coordinator's stable DNS name: <StatefulSet>-0.<its headless Service>, at its Akka port.
        Assert.Equal($"dtrain-coordinator-0.dtrain:{Option(coordinatorArgs, "--port")}", Env(worker, "DTRAIN_SEED"));
        Assert.Equal("--seed=$(DTRAIN_SEED)", workerArgs[1]);
        Assert.Equal("status.podIP", (string?)EnvEntry(worker, "POD_IP")["valueFrom"]!["fieldRef"]!["fieldPath"]);
        // SIGTERM leaves the worker --grace-period seconds for its checkpoint, within the pod's grace period.
        Assert.True((int)workerPod["spec"]!["terminationGracePeriodSeconds"]! > double.Parse(Option(workerArgs, "--grace-period")));

        foreach (var (pod, container, args) in new[] { (coordinatorPod, coordinator, coordinatorArgs), (workerPod, worker, workerArgs) })
        {
            Assert.Equal(values["image"], (string?)container["image"]);
            CheckProbes(container, int.Parse(Option(args, "--health-port")));
            Assert.NotNull(pod["spec"]!["terminationGracePeriodSeconds"]);
            Assert.Contains(pod["spec"]!["volumes"]!.AsArray(), v => (string?)v!["persistentVolumeClaim"]?["claimName"] == "dtrain-checkpoints");
            Assert.Contains(container["volumeMounts"]!.AsArray(), m => (string?)m!["mountPath"] == "/checkpoints");
        }
        // The command lines parse as dtrain's (with the values Kubernetes substitutes for $(VAR)).
        AssertParses(WorkerCommand.Create(), Substitute(workerArgs, worker));
        AssertParses(CoordinatorCommand.Create(), Substitute(coordinatorArgs, coordinator));

        var checkpoints = Find(docs, "PersistentVolumeClaim", "dtrain-checkpoints");
        Assert.Equal(["ReadWriteMany"], checkpoints["spec"]!["accessModes"]!.AsArray().Select(m => (string?)m));
        Assert.Equal(values["storage-class"], (string?)checkpoints["spec"]!["storageClassName"]);

        // Every container asks for and is limited in CPU and memory.
        foreach (var pod in docs.Where(d => d["spec"]?["template"]?["spec"] is not null).Select(d => d["spec"]!["template"]!["spec"]!))
            foreach (var c in (pod["containers"]!.AsArray()).Concat(pod["initContainers"]?.AsArray() ?? []))
                foreach (var side in new[] { "requests", "limits" })
                    foreach (var resource in new[] { "cpu", "memory" })
                        Assert.True(c!["resources"]?[side]?[resource] is not null, $"container {c!["name"]} has no {side}.{resource}");

        // The NetworkPolicy covers every pod of the job and admits only them.
        var policy = Find(docs, "NetworkPolicy", "dtrain");
        var selector = policy["spec"]!["podSelector"]!["matchLabels"]!.AsObject();
        Assert.Equal(selector.ToJsonString(), policy["spec"]!["ingress"]![0]!["from"]![0]!["podSelector"]!["matchLabels"]!.ToJsonString());
        foreach (var name in new[] { "dtrain-coordinator", "dtrain-postgres" })
            AssertSelected(selector, Find(docs, "StatefulSet", name)["spec"]!["template"]!);
        AssertSelected(selector, workerPod);

        // The ConfigMap's job is a valid job for this layout, and its akka.conf valid HOCON.
        var config = Find(docs, "ConfigMap", "dtrain-config")["data"]!;
        var jobSpec = JobConfigLoader.Parse((string)config["job.conf"]!, [$"parallel.tp={values["tp"]}", $"parallel.pp={values["pp"]}"], "the ConfigMap's job.conf");
        ParallelLayout.For(jobSpec, workers);
        Assert.Equal("postgresql", jobSpec.Persistence.Provider);
        Assert.StartsWith("/checkpoints/", jobSpec.RunDir);
        Assert.Equal("/app/data/tinyshakespeare.txt", jobSpec.Data.Path);   // where the Dockerfile puts the corpus
        Akka.Configuration.ConfigurationFactory.ParseString((string)config["akka.conf"]!);
    }

    static void CheckJobSet(IReadOnlyList<JsonNode> docs, IReadOnlyList<JsonNode> baseDocs, IReadOnlyDictionary<string, string> values)
    {
        int workers = int.Parse(values["workers"]);
        Assert.DoesNotContain(docs, d => (string?)d["kind"] is "StatefulSet" && (string?)d["metadata"]!["name"] == "dtrain-coordinator");
        Assert.DoesNotContain(docs, d => (string?)d["kind"] is "Job" or "Service" && (string?)d["metadata"]!["name"] is "dtrain-workers" or "dtrain");
        var jobSet = Find(docs, "JobSet", "dtrain");
        var spec = jobSet["spec"]!;
        Assert.Equal("InOrder", (string?)spec["startupPolicy"]!["startupPolicyOrder"]);
        Assert.True((bool)spec["network"]!["enableDNSHostnames"]!);
        Assert.True((bool)spec["network"]!["publishNotReadyAddresses"]!);
        Assert.Contains(spec["failurePolicy"]!["rules"]!.AsArray(),
            r => (string?)r!["action"] == "FailJobSet" && r["onJobFailureReasons"]!.AsArray().Any(x => (string?)x == "PodFailurePolicy"));
        Assert.True((int)spec["failurePolicy"]!["maxRestarts"]! >= 1);
        var jobs = spec["replicatedJobs"]!.AsArray();
        Assert.Equal(["coordinator", "workers"], jobs.Select(j => (string?)j!["name"]));   // InOrder: the coordinator first

        var coordinatorJob = jobs[0]!["template"]!["spec"]!;
        Assert.Equal(1, (int)coordinatorJob["completions"]!);
        Assert.Equal("Indexed", (string?)coordinatorJob["completionMode"]);
        CheckPodFailurePolicy(coordinatorJob["podFailurePolicy"]!);
        Assert.Equal("Never", (string?)coordinatorJob["template"]!["spec"]!["restartPolicy"]);
        var coordinator = Container(coordinatorJob["template"]!, "dtrain");
        Assert.Equal("false", Env(coordinator, "DTRAIN_LINGER"));   // a Job's pod ends with the job

        var workerJob = jobs[1]!["template"]!["spec"]!;
        Assert.Equal(workers, (int)workerJob["completions"]!);
        Assert.Equal(workers, (int)workerJob["parallelism"]!);
        Assert.Equal("Indexed", (string?)workerJob["completionMode"]);
        CheckPodFailurePolicy(workerJob["podFailurePolicy"]!);
        var worker = Container(workerJob["template"]!, "dtrain");
        // A JobSet pod is <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>.
        Assert.Equal($"dtrain-coordinator-0-0.{spec["network"]!["subdomain"]}:{Option(Args(coordinator), "--port")}", Env(worker, "DTRAIN_SEED"));

        // One definition of each pod: the JobSet's equal the base's but for what a JobSet changes.
        var baseCoordinator = Find(baseDocs, "StatefulSet", "dtrain-coordinator")["spec"]!["template"]!.DeepClone();
        baseCoordinator["spec"]!["restartPolicy"] = "Never";
        EnvEntry(Container(baseCoordinator, "dtrain"), "DTRAIN_LINGER")["value"] = "false";
        Assert.True(JsonNode.DeepEquals(baseCoordinator, coordinatorJob["template"]), $"the JobSet's coordinator pod is not the base's:\n{coordinatorJob["template"]}");
        var baseWorkers = Find(baseDocs, "Job", "dtrain-workers")["spec"]!.DeepClone();
        EnvEntry(Container(baseWorkers["template"]!, "dtrain"), "DTRAIN_SEED")["value"] = Env(worker, "DTRAIN_SEED");
        Assert.True(JsonNode.DeepEquals(baseWorkers, workerJob), $"the JobSet's workers Job is not the base's:\n{workerJob}");
    }

    /// <summary>Exit codes that cannot succeed on a retry fail the Job; a clean preemption and a node disruption do not count.</summary>
    static void CheckPodFailurePolicy(JsonNode policy)
    {
        var rules = policy["rules"]!.AsArray();
        int[] Codes(string action) => rules.Where(r => (string?)r!["action"] == action && r["onExitCodes"] is not null)
            .SelectMany(r => r!["onExitCodes"]!["values"]!.AsArray().Select(v => (int)v!)).Order().ToArray();
        Assert.Equal(ExitCodes.DoNotRetry.Order(), Codes("FailJob"));
        Assert.Equal([ExitCodes.Preempted], Codes("Ignore"));
        Assert.DoesNotContain(ExitCodes.Retry, Codes("FailJob").Concat(Codes("Ignore")));
        Assert.Contains(rules, r => (string?)r!["action"] == "Ignore" && r["onPodConditions"]?.AsArray().Any(c => (string?)c!["type"] == "DisruptionTarget") == true);
        Assert.All(rules.Where(r => r!["onExitCodes"] is not null), r => Assert.Equal("dtrain", (string?)r!["onExitCodes"]!["containerName"]));
    }

    static void CheckProbes(JsonNode container, int healthPort)
    {
        var port = container["ports"]!.AsArray().Single(p => (string?)p!["name"] == "health")!;
        Assert.Equal(healthPort, (int)port["containerPort"]!);
        Assert.Equal("/readyz", (string?)container["readinessProbe"]!["httpGet"]!["path"]);
        Assert.Equal("/livez", (string?)container["livenessProbe"]!["httpGet"]!["path"]);
        Assert.Equal("health", (string?)container["readinessProbe"]!["httpGet"]!["port"]);
        Assert.Equal("health", (string?)container["livenessProbe"]!["httpGet"]!["port"]);
    }

    static void AssertSelected(JsonObject selector, JsonNode podTemplate)
    {
        var labels = podTemplate["metadata"]!["labels"]!.AsObject();
        foreach (var (key, value) in selector) Assert.True((string?)labels[key] == (string?)value, $"a pod without the NetworkPolicy's label {key}");
    }

    static void AssertParses(System.CommandLine.Command command, string[] args)
    {
        var parse = command.Parse(args);
        Assert.True(parse.Errors.Count == 0, $"`dtrain {command.Name} {string.Join(' ', args)}`: {string.Join("; ", parse.Errors.Select(e => e.Message))}");
    }

    /// <summary>The container's arguments after the subcommand, with $(VAR) replaced as Kubernetes does from its env.</summary>
    static string[] Substitute(string[] args, JsonNode container) =>
        args.Skip(1).Select(a => System.Text.RegularExpressions.Regex.Replace(a, @"\$\((\w+)\)", m => EnvEntry(container, m.Groups[1].Value)["value"] is { } v ? (string)v! : "x")).ToArray();

    static string Option(string[] args, string name) =>
        args.Select(a => a.Split('=', 2)).Where(p => p[0] == name && p.Length == 2).Select(p => p[1]).SingleOrDefault()
        ?? throw new Xunit.Sdk.XunitException($"no {name}=... among [{string.Join(' ', args)}]");

    static string[] Args(JsonNode container) => container["args"]!.AsArray().Select(a => (string)a!).ToArray();

    static JsonNode Container(JsonNode podTemplate, string name) =>
        podTemplate["spec"]!["containers"]!.AsArray().Single(c => (string?)c!["name"] == name)!;

    static JsonNode EnvEntry(JsonNode container, string name) =>
        container["env"]!.AsArray().SingleOrDefault(e => (string?)e!["name"] == name) ?? throw new Xunit.Sdk.XunitException($"no env {name}");

    static string Env(JsonNode container, string name) => (string)EnvEntry(container, name)["value"]!;

    static JsonNode Find(IReadOnlyList<JsonNode> docs, string kind, string name) =>
        docs.SingleOrDefault(d => (string?)d["kind"] == kind && (string?)d["metadata"]!["name"] == name) ?? throw new Xunit.Sdk.XunitException($"no {kind} {name}");

    static IReadOnlyDictionary<string, string> ValuesOf(JsonNode configMap) =>
        configMap["data"]!.AsObject().ToDictionary(kv => kv.Key, kv => (string)kv.Value!);

    static string ReplaceFirst(string text, string old, string replacement)
    {
        int at = text.IndexOf(old, StringComparison.Ordinal);
        Assert.True(at >= 0, $"'{old.Trim()}' is not in the rendered manifests");
        return string.Concat(text.AsSpan(0, at), replacement, text.AsSpan(at + old.Length));
    }

    static string Render(string directory)
    {
        var result = TestProcesses.Run("kubectl", ["kustomize", directory], ToolTimeout);
        Assert.True(result.ExitCode == 0, $"kubectl kustomize {directory}: {result.Output}");
        return result.Stdout;
    }

    static TestProcesses.Result RunValidator(IEnumerable<string> args) =>
        TestProcesses.Run("node", [Path.Combine(Validator, "validate.mjs"), "--crd", JobSetCrd, .. args], ToolTimeout);

    static string Write(string dir, string name, string text)
    {
        string path = Path.Combine(dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    /// <summary>k8s/validate's packages, as .ci/run installs them (npm ci: the versions of its package-lock.json).</summary>
    static void EnsureValidatorInstalled()
    {
        if (Directory.Exists(Path.Combine(Validator, "node_modules", "kubernetes-models"))) return;
        var install = TestProcesses.Run("npm", ["ci", "--no-audit", "--no-fund"], TimeSpan.FromMinutes(5), Validator);
        Assert.True(install.ExitCode == 0, $"npm ci in k8s/validate: {install.Output}");
    }
}
